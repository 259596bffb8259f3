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


rule aggregate:
    """One table comparing every evaluated representation."""
    input:
        runs=linear_eval_inputs,
        code=sources("aggregate.py"),
    output:
        report("results/linear_eval.csv", caption="../report/linear_eval.rst", category="Results"),
    conda:
        ENV
    log:
        f"{LOGS}/aggregate.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m pipeline aggregate --out {output} {input.runs} > {log} 2>&1"
