"""Operator contracts that two stages share: what the lowering writes is what the engine builder reads and what
the roofline counts (:mod:`d2mc.ops.moe`)."""
