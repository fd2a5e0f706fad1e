# Ray cluster nodes for tail replicas (deploy/ray/): Ray's own image plus edgesplit with the server
# and ray extras. The gateway container (edgesplit serve --backend ray) runs from the same image.
FROM rayproject/ray:2.60.0-py311-cpu
WORKDIR /opt/edgesplit
COPY pyproject.toml README.md ./
COPY edgesplit ./edgesplit
RUN pip install --no-cache-dir '.[server,ray]'
EXPOSE 5555 8000
