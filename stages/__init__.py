"""tunepipe: one module per pipeline stage; see dvc.yaml for how they connect."""
