"""What TensorBoard shows of a federated run: the CUSTOM SCALARS layout, HPARAMS with the privacy settings first,
each round's logged values as an unsmoothed table, and the class counts as a labelled heat map.

Every per-round value is logged with the round (0-based) as its step; see :class:`~fl_dp_lightning.FederatedLogger`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

TENSORBOARD_LAYOUT = {
    "Privacy": {
        "epsilon per client": ["Multiline", [r"privacy/epsilon/.*"]],
        "largest epsilon": ["Multiline", ["privacy/epsilon_max"]],
        "user-level epsilon": ["Multiline", ["privacy/user_epsilon"]],
    },
    "Global model": {
        "validation accuracy": ["Multiline", [r"val/acc.*"]],
        "validation loss": ["Multiline", [r"val/loss.*"]],
    },
}
"""TensorBoard's CUSTOM SCALARS tab: epsilon per client and the global model's curves, one chart each (see
:func:`tensorboard_layout` for a run's own)."""

PRIVACY_FIRST = (
    "privacy.noise_multiplier",
    "privacy.max_grad_norm",
    "privacy.delta",
    "privacy.target_epsilon",
    "privacy.accountant",
)
"""The settings HPARAMS shows first (TensorBoard ticks the first five columns of a run)."""

FINAL_METRICS = {"final/test_acc": "test accuracy", "final/epsilon_max": "largest epsilon"}
"""The run's final numbers, HPARAMS's metric columns, logged once at the last round."""


def tensorboard_layout(user_level: bool) -> dict[str, dict[str, list]]:
    """The CUSTOM SCALARS layout of a run: the user-level chart only where user-level DP is on (no empty chart)."""
    privacy = {k: v for k, v in TENSORBOARD_LAYOUT["Privacy"].items() if user_level or k != "user-level epsilon"}
    return {**TENSORBOARD_LAYOUT, "Privacy": privacy}


def hparam_name(key: str) -> str:
    """The name an HPARAMS column is stored under; TensorBoard orders columns by it (differing ones first), so the
    privacy settings get a prefix that sorts before every config group. The column shows ``key``."""
    if key in PRIVACY_FIRST:
        return f"0 {key}"
    if key.startswith(("privacy.", "user_privacy.")):
        return f"1 {key}"
    return key


def hparams_summaries(params: Mapping[str, bool | int | float | str]) -> list[Any]:
    """The HPARAMS tab's experiment (columns: ``params`` by :func:`hparam_name`, shown by their keys, and
    :data:`FINAL_METRICS`) and this run's values, as summaries for a TensorBoard event file."""
    from tensorboard.plugins.hparams import summary_v2 as hp

    columns = [hp.HParam(hparam_name(key), _domain(value), display_name=key) for key, value in params.items()]
    metrics = [hp.Metric(tag, display_name=name) for tag, name in FINAL_METRICS.items()]
    values = {column: params[column.display_name] for column in columns}
    return [hp.hparams_config_pb(columns, metrics), hp.hparams_pb(values)]


def _domain(value: bool | int | float | str) -> Any:
    from tensorboard.plugins.hparams import summary_v2 as hp

    if isinstance(value, (bool, str)):
        return hp.Discrete([value])
    return hp.RealInterval(float(value), float(value))


@rank_zero_only  # other processes' loggers hold no event file
def log_hparams(logger: TensorBoardLogger, params: Mapping[str, bool | int | float | str]) -> None:
    """``params`` in HPARAMS (privacy first) and in the logger's ``hparams.yaml``, without placeholder metrics: the
    metric columns fill when :data:`FINAL_METRICS` are logged at the end."""
    logger.log_hyperparams(dict(params))  # hparams.yaml; with no metrics Lightning writes no HPARAMS summary
    writer = logger.experiment._get_file_writer()  # how Lightning's own log_hyperparams writes them
    for summary in hparams_summaries(params):
        writer.add_summary(summary)


def round_table(metrics: Mapping[str, float]) -> str:
    """A round's logged values as a markdown table, at full precision (the charts smooth by default)."""
    rows = [f"| {tag} | {value:.6g} |" for tag, value in sorted(metrics.items())]
    return "\n".join(["| value | this round |", "|---|---|", *rows])


SHOWN_CLIENT_LABELS = 40
"""Up to this many clients the heat map names each row; beyond, rows are numbered by the axis alone."""


def counts_figure(names: list[str], counts: Tensor) -> Any | None:
    """A heat map of each client's share of records per class (rows named by client, columns by class, a colour
    bar, the count written in each cell when few), as a matplotlib figure; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shares = (counts.double() / counts.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    clients, classes = counts.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.6 * classes, 14), min(1.5 + 0.3 * clients, 12)))
    image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
    ax.set(xlabel="class", ylabel="client", title="records per class (colour: share of the client's records)")
    ax.set_xticks(range(classes))
    if clients <= SHOWN_CLIENT_LABELS:
        ax.set_yticks(range(clients), names)
    if clients * classes <= 400:
        for (row, column), count in zip(
            ((r, c) for r in range(clients) for c in range(classes)), counts.flatten().tolist()
        ):
            light = shares[row, column] < 0.6 * shares.max()
            ax.text(column, row, str(count), ha="center", va="center", fontsize=7, color="w" if light else "k")
    fig.colorbar(image, ax=ax, label="share of the client's records")
    fig.tight_layout()
    return fig
