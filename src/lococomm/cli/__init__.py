"""Command line: `lococomm coordinator`, `lococomm run`."""
