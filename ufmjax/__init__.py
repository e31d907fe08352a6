"""ufmjax: a JAX differentiable simulator of activation-steering strength."""

__version__ = "0.1.0"
