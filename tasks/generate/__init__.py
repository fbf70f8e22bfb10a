"""Generation stage: backends behind one interface, and the per-segment driver."""
