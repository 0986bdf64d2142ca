"""Framework adapters: the only place that knows about array libraries."""
