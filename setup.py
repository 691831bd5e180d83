"""Packaging for cocalcproxy: the package itself plus its twistd plugin module."""

from setuptools import find_packages, setup

setup(
    name="cocalcproxy",
    version="0.1.0",
    description="A TLS proxy that lets a project's owner and collaborators reach its web servers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=[*find_packages(include=["cocalcproxy", "cocalcproxy.*"]), "twisted.plugins"],
    package_data={
        "cocalcproxy.pages": ["*.html", "static/*"],
        "cocalcproxy.directory": ["migrations/*.sql"],
    },
    include_package_data=True,
    install_requires=[
        "Twisted[tls]>=26.10,<26.11",
        "httptools>=0.9",
        "h11>=0.14",
        "pyOpenSSL>=24",
        "service-identity>=24",
        "cryptography>=42",
        "argon2-cffi>=23",
        "treq>=24",
        "prometheus_client>=0.20",
        "joserfc>=1.0",
    ],
    extras_require={
        "postgresql": ["psycopg[binary]>=3.1"],
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2",
            "hypothesis>=6",
            "treq>=24",
            "websockets>=13",
            "psycopg[binary]>=3.1",
            "mypy>=1.10",
            "ruff>=0.5",
            "types-pyOpenSSL",
            "sphinx>=7",
            "flask>=3",
            # Apps people run, driven through the proxy in headless Chromium
            # (tests/integration/test_apps_browser.py); pinned so a release cannot break the run.
            "jupyterlab==4.6.6",
            "streamlit==1.67.0",
            # Servers on a Unix socket, as the user guide's socket-folder recipes run them
            # (tests/integration/test_socket_apps.py; Jupyter is above, Flask from ">=3").
            "uvicorn==0.54.0",
            "gunicorn==27.0.1",
            "openapi-spec-validator>=0.7",
            "jsonschema>=4.18",
        ],
        "docs": ["sphinx>=7"],
    },
    entry_points={"console_scripts": ["cocalcproxy = cocalcproxy.ops.admin:main"]},
    zip_safe=False,
)
