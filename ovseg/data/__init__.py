"""Data: ToyWorld (generated scenes, the embedded default) and the benchmark vocabularies."""
