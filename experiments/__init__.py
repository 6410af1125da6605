"""The paper's evaluations and figures (``python -m experiments.<name>``, docs/reproduce.md): they
import the product (``cama``, ``store``, ``training``); the product never imports them."""
