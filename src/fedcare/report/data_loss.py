"""What became of each site's rows: read, dropped and why, used (issue 22, point 2).

An export that silently goes from 823 patients to 204 gives a model of a
different population than its user thinks; the counts are shown wherever the
run's results are: on the console of ``fedcare run``, in ``summary.json``
(``data_loss``) and in ``report.html``.

Where they may be published depends on the run's privacy:

- no differential privacy: every site's counts, in every artefact;
- any private run (``privacy.level = "record"`` or ``"site"``): none, and the
  artefacts say so. How many of a site's patients lack an outcome or a value
  is a count of a property of their records, which no guarantee of the run
  covers (record level publishes training sizes, never such counts; site
  level does not even publish sizes). A total over sites would be one too.

The console of the local runtime shows them in every case: that process holds
every site's data, so its user already owns what the counts describe. A
deployed aggregator never sees them (each site prints its own refusals).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from fedcare.data.loaders import RowAccount

NOT_RELEASED = ("Rows read, dropped and used per site are not released in a private run: "
                "how many patients lack an outcome or a value is a count of a property of "
                "their records, outside the differential privacy guarantee. `fedcare run` "
                "printed them on its console, to the holder of the data.")
MAX_CONSOLE_ROWS = 20
"""Sites listed on the console; beyond, a total line (every site is in ``summary.json``)."""
COLUMNS = ("rows read", "dropped: missing outcome", "dropped: missing feature", "rows used")


def loss_summary(accounts: Sequence[RowAccount], site_names: Sequence[str], *,
                 private: bool) -> dict[str, Any]:
    """``summary.json``'s ``data_loss``: per-site counts, or why there are none.

    Parameters
    ----------
    accounts : sequence of RowAccount
        Per source table (`fedcare.data.site_data.FederatedData.row_accounts`).
    site_names : sequence of str
        The federation's sites: accounts of other names describe a cohort
        before it was partitioned into simulated sites (``per = "source"``).
    private : bool
        Whether the run is differentially private (then nothing is released).
    """
    if private:
        return {"released": False, "note": NOT_RELEASED}
    names = set(site_names)
    per = "site" if all(a.site in names for a in accounts) else "source"
    totals = RowAccount("total", sum(a.read for a in accounts),
                        sum(a.missing_outcome for a in accounts),
                        sum(a.missing_feature for a in accounts))
    return {"released": True, "per": per, "sites": [a.to_dict() for a in accounts],
            "total": totals.to_dict()}


def loss_lines(accounts: Sequence[RowAccount], *, published: bool) -> list[str]:
    """The console block of ``fedcare run``: one line if nothing was dropped, else a table."""
    if not accounts:
        return []
    read = sum(a.read for a in accounts)
    dropped = sum(a.dropped for a in accounts)
    where = "" if published else " (console only: not in the run directory, a private run)"
    if dropped == 0:
        return [f"Data: {read} rows read from {len(accounts)} source(s), none dropped{where}."]
    lines = [f"Data: {dropped} of {read} rows dropped{where}:"]
    width = max(len("site"), *(len(a.site) for a in accounts[:MAX_CONSOLE_ROWS]))
    lines.append(f"  {'site':<{width}}  " + "  ".join(COLUMNS))
    for a in accounts[:MAX_CONSOLE_ROWS]:
        lines.append(f"  {a.site:<{width}}  " + "  ".join(
            f"{n:>{len(c)}}" for n, c in zip(_counts(a), COLUMNS, strict=True)))
    if len(accounts) > MAX_CONSOLE_ROWS:
        rest = accounts[MAX_CONSOLE_ROWS:]
        lines.append(f"  ... and {len(rest)} more site(s): {sum(a.dropped for a in rest)} of "
                     f"{sum(a.read for a in rest)} rows dropped")
    return lines


def _counts(account: RowAccount) -> tuple[int, int, int, int]:
    return (account.read, account.missing_outcome, account.missing_feature, account.used)


def loss_section(summary: Mapping[str, Any]) -> str:
    """``report.html``'s "Rows read, dropped and used" section ("" for a run without one)."""
    loss = summary.get("data_loss")
    if not loss:
        return ""
    parts = ["<h2 id='data-loss'>Rows read, dropped and used</h2>"]
    if not loss.get("released"):
        parts.append(f"<p>{escape(str(loss.get('note', NOT_RELEASED)))}</p>")
        return "\n".join(parts)
    rows = [*loss.get("sites", []), *([loss["total"]] if len(loss.get("sites", [])) > 1 else [])]
    head = "".join(f"<th>{escape(h)}</th>" for h in ("site", *COLUMNS))
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(r.get(k, '-')))}</td>" for k in
                         ("site", "read", "missing_outcome", "missing_feature", "used"))
        + "</tr>" for r in rows)
    parts.append(f"<table><tr>{head}</tr>{body}</table>")
    total = loss.get("total") or {}
    text = ("A row missing its outcome is dropped under every missing-value policy; a row "
            "missing a feature only under <code>missing = \"drop\"</code> (<code>impute</code> "
            "fills it from the site's own training rows).")
    if loss.get("per") == "source":
        text += " Counted per source, before its partition into simulated sites."
    dropped = int(total.get("missing_outcome", 0)) + int(total.get("missing_feature", 0))
    if dropped:
        share = dropped / max(int(total.get("read", 0)), 1)
        parts.append(f"<p class='warning'>{dropped} of {total.get('read')} rows "
                     f"({share:.0%}) were dropped before training. {text}</p>")
    else:
        parts.append(f"<p>No row was dropped. {text}</p>")
    return "\n".join(parts)
