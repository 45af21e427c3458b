"""The fan-out and stampede tests of a standalone Redis, run unchanged over the Redis
Cluster: tests/cluster/conftest.py's `gateway_cluster` starts the three `cachegw serve`
processes on the cluster (each test under a prefix of its own)."""

from tests import test_fanout as fanout
from tests import test_stampede as stampede

test_an_invalidation_reaches_every_gateway_and_near_cache = (
    fanout.test_an_invalidation_reaches_every_gateway_and_near_cache
)
test_a_subscriber_resumes_exactly_where_it_left_off = (
    fanout.test_a_subscriber_resumes_exactly_where_it_left_off
)
test_randomized_reads_writes_and_invalidations_never_read_stale = (
    fanout.test_randomized_reads_writes_and_invalidations_never_read_stale
)
test_500_concurrent_callers_over_three_gateways_load_once = (
    stampede.test_500_concurrent_callers_over_three_gateways_load_once
)
test_a_holder_killed_mid_fill_is_taken_over_within_deadlines = (
    stampede.test_a_holder_killed_mid_fill_is_taken_over_within_deadlines
)
test_steady_load_with_early_refresh_never_misses = (
    stampede.test_steady_load_with_early_refresh_never_misses
)
test_stale_set_race_across_processes = stampede.test_stale_set_race_across_processes
