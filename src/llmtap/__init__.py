"""llmtap: an LLM observability gateway.

Data flow, one package per step::

    gateway  ->  record  ->  queue  ->  worker  ->  handlers  ->  store / bodies
    (proxy)     (capture)   (durable)   (consume)   (chain)        (query API: server)
"""

__version__ = "0.1.0"
