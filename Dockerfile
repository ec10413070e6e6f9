# qsmprep BIDS App image: `docker run --gpus all ... qsmprep bids_dir out_dir participant`.
# torch 2.13.0 from PyPI is the CUDA build on Linux x86-64; it runs on the CPU when no GPU is
# passed in. Everything qsmprep needs is installed here: nothing is downloaded at run time.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    NIPYPE_NO_ET=1 \
    QSMPREP_CONTAINER=docker \
    MPLCONFIGDIR=/tmp/matplotlib \
    TEMPLATEFLOW_HOME=/opt/templateflow

RUN pip install torch==2.13.0

COPY . /src/qsmprep
RUN pip install "/src/qsmprep[learned]" && rm -rf /src/qsmprep
# The group level's template and atlas, fetched here: qsmprep downloads nothing when it runs.
RUN python -c "from qsmprep.group import fetch_templates; fetch_templates()" && chmod -R a+rX /opt/templateflow

# Nipype writes its work directory under the current folder unless -w is given.
WORKDIR /tmp
ENTRYPOINT ["qsmprep"]
