"""The report: speed and agreement tables, notes, the issue's targets; as text or Markdown, from a run or
from its saved JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..harness import live_heap_reader, table
from .agreement import NOTES
from .common import CAPTUM, CORR_TARGET, FAMILY_TARGETS, METHODS, OURS, PGC, TARGETS


def fmt(v, spec, empty="-"):
    return empty if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def fmt_ratio(v):
    return "-" if v is None else f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


SPEED_HEAD = (
    "method",
    "implementation",
    "img/s",
    "ms/batch",
    "x floor",
    "ours faster by",
    "peak MiB",
    "min..max ms",
    "compile s",
)
AGREE_HEAD = (
    "method",
    "peer",
    "conventions compared",
    "corr (worst)",
    "corr (mean)",
    "max |diff|",
    "max |peer|",
    "note",
)
# The agreement rows whose conventions match (the 0.999 target applies to them).
MATCHED_NOTES = (
    "same",
    "captum_matched",
    "gb_raw",
    "ggc_captum",
    "ggc_recipe",
    "gpp_matched",
    "score_matched",
    "family_same",
    "shapley",
    "finer",
    "aug",
    "fullgrad",
    "kpca_matched",
    "eigen_matched",
    "eigen_eps",
    "dff_mu",
)


def speed_table(res):
    """The speed rows of one result; failed rows' errors go to ``res["_failures"]``, for below the table."""
    rows = []
    for r in res["rows"]:
        if r["error"]:
            rows.append((r["method"], r["impl"], "failed", "", "", "", "", "", ""))
            res.setdefault("_failures", []).append(f"{r['method']}, {r['impl']}: {r['error']}")
            continue
        peer = r["impl"] not in (OURS,) and "forward" not in r["impl"]
        rows.append(
            (
                r["method"],
                r["impl"],
                fmt(r["img_per_s"], ".2f" if r["img_per_s"] < 100 else ".0f"),
                fmt(r["ms_per_batch"], ".1f"),
                fmt(r["x_floor"], ".2f"),
                fmt_ratio(r["ours_faster_by"]) if peer else "",
                fmt(r["peak_mib"], ".0f"),
                f"{r['min_ms']:.0f}..{r['max_ms']:.0f}" if r["min_ms"] is not None else "-",
                fmt(r["compile_s"], ".1f", ""),
            )
        )
    return rows


def agree_table(res, note_ids):
    rows = []
    for a in res["agreement"]:
        n = note_ids.setdefault(a["note"], len(note_ids) + 1)
        head = (METHODS[a["method"]], a["peer"], a["conventions"])
        if "error" in a:
            rows.append((*head, "error", a["error"][:60], "", "", f"[{n}]"))
            continue
        flag = "" if a["corr_min"] >= CORR_TARGET else " *"
        rows.append(
            (
                *head,
                f"{a['corr_min']:.6f}{flag}",
                f"{a['corr_mean']:.6f}",
                f"{a['max_abs_diff']:.2e}",
                f"{a['max_abs_ref']:.2e}",
                f"[{n}]",
            )
        )
    return rows


def memory_definition(on_gpu):
    if on_gpu:
        return (
            "peak MiB: device memory one call needs above the resident weights and inputs (its working "
            "memory): torch.cuda.max_memory_allocated() during the call (after "
            "reset_peak_memory_stats()) minus memory_allocated() before it; for gradcam_jax XLA's buffer "
            "plan of the compiled call (outputs + temporaries), which is what it allocates."
        )
    return (
        f"peak MiB: growth of the process's {live_heap_reader()[1]}, sampled every ms during one call, "
        f"above the loaded model and inputs: the working memory of the call, the same measure for both "
        f"frameworks (the first call after compilation; for Score-CAM the timed call, sampled every "
        f"20 ms)."
    )


def speed_target_lines(res, applicable):
    """The speed and memory targets on one (ResNet-50 float32) result."""
    lines = []
    by = {(r["method_key"], r["impl"]): r for r in res["rows"] if r.get("method_key")}
    for (method, peer), want in TARGETS.items():
        r = by.get((method, peer))
        got = r["ours_faster_by"] if r else None
        status = "n/a" if got is None else ("PASS" if got >= want else "FAIL") if applicable else "info"
        lines.append(
            f"{status:<5} {METHODS[method]} images/s vs {peer}: {fmt_ratio(got)} (target >= {want}x)"
        )
    for method, peer in (("grad_cam", PGC), ("grad_cam", CAPTUM)):
        ours, r = by.get((method, OURS)), by.get((method, peer))
        if ours and r and ours["peak_mib"] is not None and r["peak_mib"] is not None:
            ok = ours["peak_mib"] < r["peak_mib"]
            status = ("PASS" if ok else "FAIL") if applicable else "info"
            lines.append(
                f"{status:<5} Grad-CAM peak memory below {peer}: {ours['peak_mib']:.0f} vs "
                f"{r['peak_mib']:.0f} MiB"
            )
    return lines


def family_target_lines(res, applicable):
    """Issue 15's speed targets (CPU, batch 8): each family method against pytorch-grad-cam."""
    by = {(r["method_key"], r["impl"]): r for r in res["rows"] if r.get("method_key")}
    lines = []
    for (method, peer), want in FAMILY_TARGETS.items():
        r = by.get((method, peer))
        if r is None:
            continue
        got = r["ours_faster_by"]
        status = "n/a" if got is None else ("PASS" if got >= want else "FAIL") if applicable else "info"
        lines.append(
            f"{status:<5} {METHODS[method]} images/s vs {peer}: {fmt_ratio(got)} (target >= {want}x, CPU)"
        )
    return lines


def target_checks(results, batch, on_gpu):
    lines = []
    applicable = on_gpu and batch >= 256
    if not any(res["dtype"] == "float32" and res["model"] == "resnet50" for res in results):
        lines.append(
            "(the speed and memory targets are checked on the ResNet-50 float32 run; this run has none)"
        )
    for res in results:
        if res["dtype"] == "float32" and res["model"] == "resnet50":
            lines += speed_target_lines(res, applicable)
            lines += family_target_lines(res, not on_gpu and batch >= 8)
    matched = [
        a
        for res in results
        for a in res["agreement"]
        if "corr_min" in a
        and (a["note"] in MATCHED_NOTES or (a["note"] == "relu6" and "matched" in a["conventions"]))
    ]
    if matched:
        worst = min(matched, key=lambda a: a["corr_min"])
        status = "PASS" if worst["corr_min"] >= CORR_TARGET else "FAIL"
        lines.append(
            f"{status:<5} agreement where the conventions match: worst correlation "
            f"{worst['corr_min']:.6f} ({METHODS[worst['method']]} vs {worst['peer']}, "
            f"{worst['conventions']}) (target >= {CORR_TARGET})"
        )
    if not applicable:
        lines.append(
            "(speed and memory targets are for a GPU at batch 256; on this run they are shown for "
            "information only)"
        )
    return lines


def speed_notes(results, on_gpu):
    """Notes on what the speed rows of this run show (only the ones that apply)."""
    lines = []
    rows = [(res, r) for res in results for r in res["rows"]]
    if any(r["impl"] == PGC and r["error"] and "BFloat16" in r["error"] for _, r in rows):
        lines.append(
            "pytorch-grad-cam fails on bfloat16 models: it converts activations and gradients to "
            "NumPy (.cpu().numpy()), which has no bfloat16 type."
        )
    for res in results:
        ok = [r for r in res["rows"] if not r["error"]]
        name = f"{res['label']} {res['dtype']}"
        torch_fwd = next((r for r in ok if r["impl"].startswith("torch forward")), None)
        if torch_fwd and torch_fwd["x_floor"] and torch_fwd["x_floor"] < 0.9:
            lines.append(
                f"{name}: torch's eager forward takes {torch_fwd['x_floor']:.2f}x the time of our "
                f"jit forward here: on this device XLA's compiled network is the slower one, every "
                f"gradcam_jax method on this model inherits that, and the peers' ratios to ours are "
                f"lower for it."
            )
        low = [r["method"] for r in ok if r["impl"] == OURS and r["x_floor"] and r["x_floor"] < 0.95]
        if low:
            lines.append(
                f"{name}: x floor below 1 for {', '.join(low)}: XLA compiles the plain forward and "
                f"the forward inside an explainer as different programs (on CPU it may fuse the "
                f"network's tail differently), so the floor is not always the faster one; see the "
                f"bench_throughput section of benchmarks/README.md."
            )
    return lines


def header_lines(env, peers_lines, markdown):
    v = env["versions"]
    vers = ", ".join(f"{k} {v[k]}" for k in v if v[k])
    settings = env["settings"]
    out = [
        f"date: {env['date_utc']}",
        f"jax device: {env['jax_device']}; torch device: {env['torch_device']}; "
        f"host: {env['host_cpu']}, load average at start {env['load_average_start']}",
        f"python {env['python']}; {vers}",
        f"preset {env['preset']}: batch {settings['batch']}, "
        f"{settings['size']} px, {settings['repeats']} timed rounds (median; peers interleaved with "
        f"ours), "
        f"Score-CAM batch {settings['score_cam_batch']} at {settings['score_cam_size']} px "
        f"(chunk {settings['score_cam_chunk']}) on {', '.join(settings['score_cam_models']) or 'none'}, "
        f"agreement on the first {settings['agree_batch']} image(s); CPU threads per framework: "
        f"{settings['threads'] or 'framework default'}",
    ]
    out = [("- " if markdown else "") + line for line in out]
    if not markdown and peers_lines:
        out += ["peers:", *peers_lines]
    return out


def result_lines(res, settings, note_ids, markdown):
    """One model and dtype: its heading, notes, speed table, skipped and failed methods, agreement."""
    size = settings["size"]
    heading = f"{res['label']} · {res['dtype']} · batch {settings['batch']} · {size}x{size}"
    out = [f"\n### {heading}\n" if markdown else f"\n== {heading} =="]
    item = "- " if markdown else "  "
    out += [item + n for n in res["notes"]]
    if "logits_max_abs_diff" in res:
        out.append(
            item + f"logits, torch vs ours (float32): max |diff| "
            f"{res['logits_max_abs_diff']:.2e} (max |logit| {res['logits_max_abs']:.2f})"
        )
    out.append("")
    out.append(table(SPEED_HEAD, speed_table(res), markdown=markdown, group_first=not markdown))
    gap = "\n" if markdown else ""
    out += [gap + f"{METHODS.get(method, method)}: skipped ({why})" for method, why in res["skipped"]]
    out += [gap + f"failed: {failure}" for failure in res.pop("_failures", [])]
    if res["agreement"]:
        out.append("")
        out.append(table(AGREE_HEAD, agree_table(res, note_ids), markdown=markdown, group_first=not markdown))
    return out


def notes_lines(results, on_gpu, note_ids):
    lines = [
        "x floor: time / our jit-compiled forward pass of the same batch. ours faster by: the peer's "
        "median time / ours' median time, timed in the same rounds.",
        memory_definition(on_gpu),
        "float32 runs use full float32 on both sides (jax default_matmul_precision('highest'), torch "
        "TF32 off); bfloat16 runs cast the compute (ours: the model's dtype / bf16 parameters; torch: "
        "model.to(bfloat16)).",
        "corr: Pearson correlation per image (worst and mean over the compared images); * marks a value "
        "below 0.999, each explained by its note.",
    ]
    lines += speed_notes(results, on_gpu)
    lines += [f"[{n}] {NOTES[key]}" for key, n in sorted(note_ids.items(), key=lambda kv: kv[1])]
    return lines


def render(env, results, on_gpu, peers_lines, markdown=False):
    """The whole report of one run: header, every model and dtype, notes, targets."""
    out = header_lines(env, peers_lines, markdown)
    note_ids = {}
    for res in results:
        out += result_lines(res, env["settings"], note_ids, markdown)
    item = "- " if markdown else ""
    for title, lines in (
        ("Notes", notes_lines(results, on_gpu, note_ids)),
        ("Targets", target_checks(results, env["settings"]["batch"], on_gpu)),
    ):
        out.append(f"\n### {title}\n" if markdown else f"\n== {title} ==")
        out += [item + line for line in lines]
    return "\n".join(out)


def report_from_json(files, markdown_path):
    """Render saved runs (``--json`` files) again, one after the other."""
    text, md = [], []
    for f in files:
        data = json.loads(Path(f).read_text())
        env, results = data["environment"], data["results"]
        on_gpu = env["jax_device"].startswith("gpu")
        for res in results:  # JSON turned the (method, reason) tuples into lists
            res["skipped"] = [tuple(x) for x in res.get("skipped", [])]
        note = "" if env.get("complete", True) else "\n(INCOMPLETE: this run stopped early.)"
        text.append(f"# {f}\n" + render(env, results, on_gpu, []) + note)
        md.append(
            f"## {Path(f).name}\n\n"
            + render(env, results, on_gpu, [], markdown=True)
            + note
            + f"\n\nTotal wall time {env.get('wall_s', float('nan')):.0f} s.\n"
        )
    print("\n\n".join(text))
    if markdown_path:
        Path(markdown_path).write_text("\n\n".join(md))
