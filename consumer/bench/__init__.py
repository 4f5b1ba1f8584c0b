"""`cdc-embedder bench`: how fast the pipeline is, against the model alone and the hardware's bound."""
