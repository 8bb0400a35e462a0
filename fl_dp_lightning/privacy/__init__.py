"""Privacy accounting."""

from fl_dp_lightning.privacy.accountants import epsilon_spent, make_accountant

__all__ = ["epsilon_spent", "make_accountant"]
