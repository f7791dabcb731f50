"""The writer process: a store's work in a process of its own, behind ``Store``.

``client.WriterClient`` implements ``Store`` by sending typed requests (``messages``) through
a pipe per client; ``server.serve`` runs in the writer process and does each request with a
``LocalStore``. ``docs/design.md`` draws the processes and the ordering rules.
"""

from expforge.tracking._writer.client import WriterClient

__all__ = ["WriterClient"]
