"""What the tests and the benchmarks share: tiny models and seeded stores (``stores``), inputs
(``inputs``) and real service processes (``processes``). Neither a test nor a benchmark; the
product never imports it."""
