"""The values each choice-valued setting accepts."""

DATA_SOURCES = ("mnist", "fashion_mnist", "synthetic")
DATA_FEATURES = ("pixels", "scatternet")
CLIENT_RUNTIMES = ("local", "syft")
SYFT_APPROVALS = ("auto", "manual")
PARTITIONS = ("iid", "dirichlet", "shards", "quantity")
CLIENT_SAMPLINGS = ("uniform", "poisson", "epoch")
CLIENT_FAILURES = ("drop", "raise")
ACCOUNTANTS = ("pld", "rdp", "gdp")
RDP_CONVERSIONS = ("improved", "classic")
LOSS_REDUCTIONS = ("mean", "sum")
ACCELERATORS = ("cpu", "gpu")
NORM_FIXES = ("auto", "groupnorm", "layernorm", "identity")
MIN_NOISE_MULTIPLIER = 0.1
"""Smallest noise multiplier accepted under DP: below it epsilon runs into the hundreds and the PLD accountant's
grid grows past what it can compute."""
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
ENGINES = ("opacus", "vectorized")
USER_ACCOUNTANTS = ("pld", "rdp", "prv")
USER_MECHANISMS = ("dp_fedavg", "dp_ftrl")
ENGINE_LOSSES = ("cross_entropy", "nll", "mse", "bce_with_logits")
PER_EXAMPLE = ("auto", "layers", "vmap")
MEMORY_FORMATS = ("auto", "channels_last", "preserve")
AUDIT_METHODS = ("none", "one_run")
AUDIT_CANARIES = ("dirac", "input")
