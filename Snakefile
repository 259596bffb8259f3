# nnbyol: BYOL with nearest-neighbour positives mined in a learned latent space.
# Wiring only: the config, one rule file per stage, and the default target.

configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/latent.smk"
include: "workflow/rules/neighbours.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"


# Seconds of bookkeeping run where snakemake runs, never waiting in a cluster's queue.
localrules: check_data, purity, untrained, evaluate_latent, aggregate, figures, combine


rule all:
    input:
        "results/linear_eval.csv",
        report_inputs,
    default_target: True
