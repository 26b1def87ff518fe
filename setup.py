from setuptools import find_packages, setup

setup(
    name="chimera_jax",
    version="0.1.0",
    description="JAX/Flax research code for the Chimera family of hybrid sequence models",
    python_requires=">=3.12",
    packages=find_packages(include=["chimera_jax", "chimera_jax.*", "kernels_pallas", "kernels_pallas.*"]),
    package_data={"chimera_jax.data": ["corpora/*"]},
    install_requires=[
        "jax==0.11.2",
        "jaxlib==0.11.2",
        "flax==0.12.12",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "chex==0.1.92",
        "grain==0.2.18",
        "array-record==0.8.6",
        "ml-collections==1.1.0",
        "tensorflow-datasets==4.9.10",
        "sentencepiece==0.2.3",
        "tensorboardX==2.6.5",
        "tqdm",
        "einops==0.8.2",
        "numpy",
        "matplotlib",
        "pillow",
        "safetensors==0.8.0",   # export
        "flatbuffers==25.12.19",  # jax.export serialization
    ],
    extras_require={"test": ["pytest", "pytest-xdist"]},
)
