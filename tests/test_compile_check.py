"""The compile check's reading of PTX: the arrival ordering that the input pass's finishing rests on
(`make test` runs the check itself on the real builds)."""

import pytest

from lime_kernels.compile_check import arrival_ordered

STORE = "@%p2 st.global.v4.b32 [ %rd20 + 0 ], { %r30, %r31, %r32, %r33 };"
BARRIER = "bar.sync 	0;"
ATOMIC = "@%p1 atom.global.gpu.acq_rel.add.u32 %r3, [ %rd7 + 0 ], %r4;"
LOAD = "ld.global.cg.b32 { %r14 }, [ %rd10 + 0 ];"


def ptx(*lines):
    return "\n".join("\t" + line for line in lines)


def test_arrival_ordered_accepts_barrier_atomic_barrier():
    assert arrival_ordered(ptx(STORE, BARRIER, ATOMIC, "@%p1 st.shared::cta.b32 [ %r5 + 0 ], %r3;", BARRIER,
                               "ld.shared.b32 %r12, [global_smem];", LOAD))


@pytest.mark.parametrize("lines", [
    (STORE, ATOMIC, BARRIER, LOAD),  # no barrier between the stores and the atomic
    (BARRIER, STORE, ATOMIC, BARRIER, LOAD),  # the barrier comes before the last store
    (STORE, BARRIER, ATOMIC, LOAD, BARRIER),  # a load before the second barrier
    (STORE, BARRIER, ATOMIC.replace("@%p1 ", ""), BARRIER, LOAD),  # every thread adds
    (STORE, BARRIER, ATOMIC.replace("acq_rel", "relaxed"), BARRIER, LOAD),  # no acquire-release
    (STORE, BARRIER, BARRIER, LOAD),  # no atomic
])
def test_arrival_ordered_rejects_what_would_race(lines):
    assert not arrival_ordered(ptx(*lines))
