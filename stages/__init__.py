"""See recoup/__init__.py."""
