rule evaluate_pixels:
    """Linear probe on standardised raw pixels: the floor every representation must beat."""
    input:
        data=f"{R}/data.npz",
        code=sources("evaluate.py"),
    output:
        eval_json("pixels"),
    params:
        cfg=params_of("evaluate"),
        dataset=DS,
    conda:
        ENV
    log:
        f"{LOGS}/evaluate/pixels.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python -m pipeline --threads {threads} evaluate --params {params.cfg:q} --run pixels"
        " --dataset {params.dataset} --source {input.data} --data {input.data} --out {output} > {log} 2>&1"


rule evaluate_latent:
    """Linear probe on a latent space itself, before BYOL uses it."""
    input:
        source=f"{R}/latent/{{model}}/latents.parquet",
        data=f"{R}/data.npz",
        code=sources("evaluate.py"),
    output:
        os.path.join(R, "eval", "latent-{model}.json"),
    params:
        cfg=params_of("evaluate"),
        dataset=DS,
    log:
        f"{LOGS}/evaluate/latent-{{model}}.log",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python -m pipeline --threads {threads} evaluate --params {params.cfg:q}"
        " --run latent-{wildcards.model} --dataset {params.dataset} --source {input.source}"
        " --data {input.data} --out {output} > {log} 2>&1"


rule evaluate_byol:
    """Frozen BYOL encoder (no projector), no augmentation: linear probe and kNN."""
    input:
        source=byol_encoder,
        data=f"{R}/data.npz",
        code=sources("evaluate.py"),
    output:
        os.path.join(R, "eval", "{run}", "seed{seed}.json"),
    wildcard_constraints:
        run=r"byol-[a-z0-9-]+",
    params:
        cfg=params_of("evaluate"),
        dataset=DS,
        device=DEVICE,
    log:
        f"{LOGS}/evaluate/{{run}}-seed{{seed}}.log",
    conda:
        ENV
    threads: HEAVY
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=GPU,
    shell:
        "python -m pipeline --threads {threads} evaluate --params {params.cfg:q}"
        " --run {wildcards.run} --seed {wildcards.seed} --dataset {params.dataset}"
        " --device {params.device} --source {input.source} --data {input.data}"
        " --out {output} > {log} 2>&1"


rule aggregate:
    """One table comparing every evaluated representation."""
    input:
        runs=linear_eval_inputs,
        purity=purity_table,
        code=sources("aggregate.py"),
    output:
        report("results/linear_eval.csv", caption="../report/linear_eval.rst", category="Results"),
    conda:
        ENV
    params:
        purity=purity_flag,
    log:
        f"{LOGS}/aggregate.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m pipeline aggregate --out {output} {params.purity} {input.runs} > {log} 2>&1"


rule accuracy_chart:
    """Bar chart of top-1 per run, mean +- std over seeds, for the report."""
    input:
        table="results/linear_eval.csv",
        code=sources("plots.py"),
    output:
        report("results/accuracy.png", caption="../report/accuracy.rst", category="Results"),
    log:
        f"{LOGS}/accuracy_chart.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m pipeline accuracy-chart --table {input.table} --out {output} > {log} 2>&1"
