"""Operations on the vectors over time, run from the CLI beside the consumer."""
