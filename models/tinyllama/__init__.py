"""The recipe of qcompile's small trained Llama (see models/README.md)."""
