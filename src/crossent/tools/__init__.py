"""crossent's tooling: the ``crossent`` command (``cli``: demo, bench, info), the benchmark runner
(``bench``), the language-model demo (``demo_lm``) and the machine line (``machine``). It uses the
library's public API (and ``config`` / ``impl.registry`` for ``crossent info``); the library never
imports it."""
