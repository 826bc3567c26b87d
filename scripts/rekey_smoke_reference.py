"""One-off migration (issue 16), kept so it can be checked: re-key a smoke-reference fingerprint
(tests/data/smoke_reference.*.json.gz) from the old summaries (e1_summary.json, e6_summary.json, the
first ablation kind copied to the top level of E2/E3, E4 by label) to the one summary.json shape.
The same numbers, moved: the smoke run of the new code matches the re-keyed file at 1e-6.

    python scripts/rekey_smoke_reference.py tests/data/smoke_reference.*.json.gz   (applied once)
"""
import gzip, json, sys, re

E2_RUN = ("checkpoint", "n_layers", "n_heads", "n_prompts", "n_min", "ablations", "reference_stream")
E3_RUN = ("checkpoint", "policy", "control", "finetune_steps", "n_prompts", "n_min", "ablations", "reference_stream",
          "probe", "single_checkpoint", "claim2a_n_from")
E4_RUN = ("checkpoint", "compare", "prune_policy", "ablations", "reference_stream", "n_fit", "n_test", "fit_stream",
          "test_stream", "probe")

def kind_of(label):
    m = re.match(r"h=\d+ pruned(?: \((mean|resample)\))?$", label)
    return None if m is None else (m.group(1) or "zero")

def transform(fp):
    out = {}
    for key, v in fp.items():
        parts = key.split("/")
        stage, name = (parts[-2] if len(parts) > 1 else ""), parts[-1]
        if name == "e1_summary.json":
            key, v = key[: -len(name)] + "summary.json", {"experiment": "E1", **v}
        elif name == "e6_summary.json":
            key, v = key[: -len(name)] + "summary.json", {"experiment": "E6", **v}
        elif name == "summary.json" and stage == "e2":
            v = {"experiment": "E2", **{k: v[k] for k in E2_RUN},
                 "by_ablation": {k: {f: x for f, x in b.items() if f != "claim1"} for k, b in v["by_ablation"].items()}}
        elif name == "summary.json" and stage == "e3":
            v = {"experiment": "E3", **{k: v[k] for k in E3_RUN}, "by_ablation": v["by_ablation"]}
        elif name == "summary.json" and stage == "e4":
            per = {lab: {"gates": v["gates"][lab], "mean_probe_risk_norm": v["mean_probe_risk_norm"][lab]}
                   for lab in v["mean_probe_risk_norm"]}
            kinds = {lab: kind_of(lab) for lab in per}
            v = {"experiment": "E4", **{k: v[k] for k in E4_RUN},
                 "models": {lab: x for lab, x in per.items() if kinds[lab] is None},
                 "by_ablation": {k: {lab: x for lab, x in per.items() if kinds[lab] == k} for k in v["ablations"]}
                 if any(kinds.values()) else {}}
        elif name == "summary.json" and stage == "e7":
            v = {"experiment": "E7", **v}
        out[key] = v
    return out

for path in sys.argv[1:]:
    with gzip.open(path, "rt") as f:
        fp = json.load(f)
    new = transform(fp)
    with gzip.open(path, "wt") as f:
        json.dump(new, f, sort_keys=True)
    print(path, len(fp), "->", len(new))
