# The Streamlit app as a Hugging Face Docker Space (README front matter of that Space: `sdk: docker`,
# `app_port: 8501`). Hugging Face runs the container as user 1000; the port is Streamlit's default.
FROM python:3.11-slim

# DejaVu Sans draws the Greek labels of the grids (Pillow's own font has no Greek letters).
RUN apt-get update && apt-get install -y --no-install-recommends fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*

RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    D2DPM_CACHE_DIR=/home/user/.cache/d2dpm \
    PYTHONUNBUFFERED=1
WORKDIR /home/user/app

# The CPU build of torch first (from PyTorch's CPU index; the PyPI wheel for Linux bundles CUDA, several GB),
# then the rest, which finds torch==2.13.0 already satisfied.
COPY --chown=user requirements.txt .
RUN pip install --no-cache-dir --user --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir --user -r requirements.txt

COPY --chown=user . .

EXPOSE 8501
CMD ["streamlit", "run", "app.py", "--server.port", "8501", "--server.address", "0.0.0.0", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
