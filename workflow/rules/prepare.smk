rule prepare:
    """Turn the configured data-set source into the canonical prepared file."""
    input:
        code=sources("prepare.py"),
    output:
        f"{R}/data.npz",
    params:
        cfg=params_of("prepare"),
    conda:
        ENV
    log:
        f"{LOGS}/prepare.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python -m pipeline --threads {threads} prepare --params {params.cfg:q} --out {output} > {log} 2>&1"
