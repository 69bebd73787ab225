"""ttt.testing's budget helpers."""

from __future__ import annotations

import pytest
import torch

from ttt.testing import BudgetChecks


def test_budget_checks_name_every_quantity_over_budget_once_at_the_end():
    ref = torch.ones(4, dtype=torch.float64)
    low = ref.float()
    with pytest.raises(AssertionError) as info:
        with BudgetChecks() as check:
            check("o", ref.float() + 1, ref, low, torch.float32)
            check("fine", low, ref, low, torch.float32)
            check("grad k", ref.float() - 2, ref, low, torch.float32)
    msg = str(info.value)
    assert msg.startswith("2 over budget: o: max err 1.000e+00") and "grad k: max err 2.000e+00" in msg
    assert "fine" not in msg
    with BudgetChecks() as check:  # all within budget: nothing raised
        check("o", low, ref, low, torch.float32)
