"""promoe runtime: load a Mixture-of-Experts checkpoint with its experts offloaded.

The library half of promoe (the CLI in ``promoe_cli`` only parses, calls and renders).
Everything that is not an expert lives on the device; experts live quantized in a host
expert store (:mod:`runtime.expert_store`), a byte-budgeted cache of them lives on the
device (:mod:`runtime.expert_cache`), and each transformers ``mlp.experts`` module is
replaced by :class:`runtime.offload.OffloadedExperts`, which serves the model's own
routing decisions from that cache.

This package never imports typer, rich or prompt_toolkit.
"""
