# BYOL runs live in results/<ds>/byol/<name>/seed<N>/ with name `baseline`,
# `<variant>-<model>-<metric>` (offline latent neighbours), `<variant>-<model>-<metric>-r<R>`
# (refresh round R), `<variant>-online` or `untrained`. state.pt beside the outputs is the
# resumable checkpoint: a killed job re-run by snakemake continues from it. It is a param, not an
# output, so Snakemake never deletes it; after training it holds the finished encoder, so a
# job whose outputs Snakemake discarded as incomplete (Ctrl-C, kill -9) only rewrites them.

# What training computes (pipeline.byol.CODE_FILES, plus the loss plot).
BYOL_CODE = sources(
    "byol.py", "byol_model.py", "byol_optim.py", "byol_variants.py", "byol_sources.py",
    "byol_encoder.py", "backbones.py", "augment.py", "plots.py",
)


rule byol_baseline:
    """Plain BYOL: both views are augmentations of the same image."""
    input:
        data=f"{R}/data.npz",
        checked=ancient(CHECKED),
        code=BYOL_CODE,
    output:
        encoder=f"{R}/byol/{{variant}}/seed{{seed}}/encoder.pt",
        history=f"{R}/byol/{{variant}}/seed{{seed}}/history.csv",
        loss_plot=report(
            f"{R}/byol/{{variant}}/seed{{seed}}/loss.png",
            caption="../report/byol_loss.rst",
            category="BYOL",
            subcategory="{variant}",
        ),
    wildcard_constraints:
        variant="baseline",
    params:
        cfg=byol_cfg("latent"),
        opts=runtime_of("byol"),
        device=DEVICE,
        state=f"{R}/byol/{{variant}}/seed{{seed}}/state.pt",
        source="",
    log:
        f"{LOGS}/byol/{{variant}}-seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/byol/{{variant}}-seed{{seed}}.tsv"
    conda:
        ENV
    threads: HEAVY
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=GPU,
    shell:
        "python -m pipeline --threads {threads} byol --variant {wildcards.variant}"
        " --seed {wildcards.seed} --params {params.cfg:q} --runtime {params.opts:q}"
        " --device {params.device} {params.source}"
        " --data {input.data} --out {output.encoder} --state {params.state}"
        " --history {output.history} --loss-plot {output.loss_plot} > {log} 2>&1"


use rule byol_baseline as byol_online with:
    output:
        encoder=f"{R}/byol/{{variant}}-online/seed{{seed}}/encoder.pt",
        history=f"{R}/byol/{{variant}}-online/seed{{seed}}/history.csv",
        loss_plot=report(
            f"{R}/byol/{{variant}}-online/seed{{seed}}/loss.png",
            caption="../report/byol_loss.rst",
            category="BYOL",
            subcategory="{variant}-online",
        ),
    wildcard_constraints:
        variant=NEIGHBOUR_VARIANTS,
    params:
        cfg=byol_cfg("online"),
        opts=runtime_of("byol"),
        device=DEVICE,
        state=f"{R}/byol/{{variant}}-online/seed{{seed}}/state.pt",
        source="--online",
    log:
        f"{LOGS}/byol/{{variant}}-online-seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/byol/{{variant}}-online-seed{{seed}}.tsv"


rule byol_neighbours:
    """BYOL whose positives or targets use neighbours mined in a latent space."""
    input:
        data=f"{R}/data.npz",
        checked=ancient(CHECKED),
        neighbours=f"{R}/neighbours/{{model}}-{{metric}}/neighbours.parquet",
        code=BYOL_CODE,
    output:
        encoder=f"{R}/byol/{{variant}}-{{model}}-{{metric}}/seed{{seed}}/encoder.pt",
        history=f"{R}/byol/{{variant}}-{{model}}-{{metric}}/seed{{seed}}/history.csv",
        loss_plot=report(
            f"{R}/byol/{{variant}}-{{model}}-{{metric}}/seed{{seed}}/loss.png",
            caption="../report/byol_loss.rst",
            category="BYOL",
            subcategory="{variant}-{model}-{metric}",
        ),
    wildcard_constraints:
        variant=NEIGHBOUR_VARIANTS,
    params:
        cfg=byol_cfg("latent"),
        opts=runtime_of("byol"),
        device=DEVICE,
        state=f"{R}/byol/{{variant}}-{{model}}-{{metric}}/seed{{seed}}/state.pt",
    log:
        f"{LOGS}/byol/{{variant}}-{{model}}-{{metric}}-seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/byol/{{variant}}-{{model}}-{{metric}}-seed{{seed}}.tsv"
    conda:
        ENV
    threads: HEAVY
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=GPU,
    shell:
        "python -m pipeline --threads {threads} byol --variant {wildcards.variant}"
        " --seed {wildcards.seed} --params {params.cfg:q} --runtime {params.opts:q}"
        " --device {params.device}"
        " --data {input.data} --neighbours {input.neighbours} --out {output.encoder}"
        " --state {params.state} --history {output.history}"
        " --loss-plot {output.loss_plot} > {log} 2>&1"


use rule byol_neighbours as byol_refresh with:
    input:
        data=f"{R}/data.npz",
        checked=ancient(CHECKED),
        neighbours=f"{R}/neighbours/refresh/{{variant}}-{{model}}-{{metric}}-r{{round}}/seed{{seed}}/neighbours.parquet",
        code=BYOL_CODE,
    output:
        encoder=f"{R}/byol/{{variant}}-{{model}}-{{metric}}-r{{round}}/seed{{seed}}/encoder.pt",
        history=f"{R}/byol/{{variant}}-{{model}}-{{metric}}-r{{round}}/seed{{seed}}/history.csv",
        loss_plot=report(
            f"{R}/byol/{{variant}}-{{model}}-{{metric}}-r{{round}}/seed{{seed}}/loss.png",
            caption="../report/byol_loss.rst",
            category="BYOL",
            subcategory="{variant}-{model}-{metric}-r{round}",
        ),
    wildcard_constraints:
        variant=NEIGHBOUR_VARIANTS,
        round=r"[2-9]|[1-9]\d+",
    params:
        cfg=byol_cfg("refresh"),
        opts=runtime_of("byol"),
        device=DEVICE,
        state=f"{R}/byol/{{variant}}-{{model}}-{{metric}}-r{{round}}/seed{{seed}}/state.pt",
    log:
        f"{LOGS}/byol/{{variant}}-{{model}}-{{metric}}-r{{round}}-seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/byol/{{variant}}-{{model}}-{{metric}}-r{{round}}-seed{{seed}}.tsv"


rule byol_untrained:
    """The randomly initialised encoder: the control that shows what training added."""
    input:
        data=f"{R}/data.npz",
        checked=ancient(CHECKED),
        code=sources("byol_encoder.py", "byol_model.py", "backbones.py"),
    output:
        encoder=f"{R}/byol/untrained/seed{{seed}}/encoder.pt",
    params:
        cfg=untrained_cfg(),
    log:
        f"{LOGS}/byol/untrained-seed{{seed}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m pipeline --threads {threads} byol-untrained --seed {wildcards.seed}"
        " --params {params.cfg:q} --data {input.data} --out {output.encoder} > {log} 2>&1"


rule embed:
    """A BYOL encoder's features of every image, in the latents.parquet schema (opt-in target:
    results/<tag>/byol/<name>/seed<N>/features.parquet)."""
    input:
        encoder=f"{R}/byol/{{name}}/seed{{seed}}/encoder.pt",
        data=f"{R}/data.npz",
        code=sources("embed.py", "byol_encoder.py", "byol_model.py", "backbones.py"),
    output:
        f"{R}/byol/{{name}}/seed{{seed}}/features.parquet",
    wildcard_constraints:
        name=r"[a-z0-9-]+",
    params:
        dataset=DS,
        device=DEVICE,
    log:
        f"{LOGS}/embed/{{name}}-seed{{seed}}.log",
    conda:
        ENV
    threads: HEAVY
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=GPU,
    shell:
        "python -m pipeline --threads {threads} embed --run byol-{wildcards.name}"
        " --dataset {params.dataset} --device {params.device} --encoder {input.encoder}"
        " --data {input.data} --out {output} > {log} 2>&1"
