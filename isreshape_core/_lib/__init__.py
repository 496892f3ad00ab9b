"""Private implementation helpers of the core, one job per module; nothing here is public API.

- :mod:`.namespace`: the array-API namespace of the inputs (with a ``torch.compile``-safe torch
  namespace), the ``Array``/``Namespace`` type aliases and the device of an array;
- :mod:`.dtypes`: the compute dtype and the largest safe exponent of a dtype;
- :mod:`.tracing`: whether values may be read (eager) or are traced, and NaN poisoning of
  traced rows that hold invalid inputs;
- :mod:`.checks`: argument checks at the public boundary (axes, dtypes, choices, intervals);
- :mod:`.inputs`: log weights, masks and rewards validated, promoted and broadcast;
- :mod:`.rows`: per-row parameters (a number or one value per row of the batch);
- :mod:`.numerics`: overflow-free log-space arithmetic (shift by the max, log-sum-exp, capped
  exponentials, moments of log weights);
- :mod:`.saturate`: products with an exponential that saturate at the largest float, and
  products and quotients that overflow to ``+-inf`` without a warning;
- :mod:`.reduce`: the public :class:`Reducer` protocol and reductions over shards;
- :mod:`.sizes`: when an array counts as large (eager paths then trade operators for fewer
  passes over memory);
- :mod:`.pareto`: constants of the generalised Pareto fit shared by the portable PSIS and its
  NumPy kernel.

Every helper works on arrays of any array-API namespace and never pulls a Python scalar out of
an array, except the value checks, which run only on concrete (eager) inputs so that the same
code traces under ``jax.jit`` and ``torch.compile``.
"""
