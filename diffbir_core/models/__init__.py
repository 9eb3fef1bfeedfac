"""Network modules of diffbir_core (stage-1 restorers, SD parts, control branch): one file per model."""
