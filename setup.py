from setuptools import setup

setup(
    name="hapo-kernels",
    version="0.1.1",
    description="Fused Triton kernels for GRPO-family RL and Hindsight-Anchored Policy Optimization",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=["hapo_kernels", "hapo_kernels.triton", "hapo_kernels.cpu",
              "hapo", "hapo.integrations", "hapo.demo", "bench"],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "liger-kernel==0.8.5"],
        "bench": ["matplotlib", "tabulate", "liger-kernel==0.8.5"],
        "trl": ["trl==1.16.0"],      # the versions tests/integrations runs against
        "verl": ["verl==0.9.1"],
    },
    entry_points={"console_scripts": ["hapo-bench=bench.__main__:main",
                                      "hapo-demo=hapo.demo.__main__:main"]},
)
