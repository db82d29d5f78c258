"""Applications on top of the library: the command line, the demo, the experiment wiring that
turns a configuration into a trained network and a results table, plots and small models."""
