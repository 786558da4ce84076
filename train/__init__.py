"""Training, evaluation and sampling for every registered architecture."""
