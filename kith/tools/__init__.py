"""The command-line applications built on the library: bench, study, compare, recipes, plots, export.
May import: anything in the library; nothing in the library imports them (the CLI imports them lazily)."""
