"""promoe's command line: parses options, calls the runtime, renders its events.

Heavy imports (torch, transformers) happen inside command bodies so ``promoe --help``
stays instant.
"""
