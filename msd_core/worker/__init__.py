"""The worker process: the generator (process, run as ``python -m msd_core.worker``), its JSON-lines protocol,
the client any Python drives it with (Blender's included), and what its Python environment offers."""
