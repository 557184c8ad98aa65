"""Shared test settings: the hypothesis profiles of the fuzz suite.

`ci` (the default) is bounded and reproducible: a fixed number of examples drawn from a derandomized
source, no example database, and no shrinking (a failure against a server is reported as found; a
frozen server would make every shrink step wait for its deadline). `long` is for a local hunt:
`pytest tests/test_service_fuzz.py --hypothesis-profile=long`.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, Phase, settings

# an example is one or a few calls that each end within their own gRPC deadline (see the fuzz suite);
# this is only the backstop for an example that hangs outside a call
_EXAMPLE_DEADLINE = timedelta(seconds=120)
_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci", max_examples=12, derandomize=True, database=None, deadline=_EXAMPLE_DEADLINE,
    phases=(Phase.explicit, Phase.generate), report_multiple_bugs=False, suppress_health_check=_SLOW_IS_FINE,
    print_blob=False,
)
settings.register_profile(
    "long", max_examples=400, derandomize=False, deadline=_EXAMPLE_DEADLINE,
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
    suppress_health_check=_SLOW_IS_FINE, print_blob=True,
)
settings.load_profile("ci")
