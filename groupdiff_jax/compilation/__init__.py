"""Ahead-of-time compilation for TPU topologies on a CPU host (libtpu): topology names, HLO
analysis (trip-count-weighted FLOPs and collectives) and the fit report of `groupdiff_jax.aot`."""
