"""Ask a model served by `tuneforge serve`, with the official openai SDK (streamed).

    python examples/ask_server.py http://127.0.0.1:8000/v1 KEY MODEL "What is overfitting?"
"""

import sys
import time

from openai import OpenAI

SYSTEM = "You are a tutor who explains machine learning in the style of William Shakespeare."

base_url, key, model, question = sys.argv[1:5]
client = OpenAI(base_url=base_url, api_key=key)
for _ in range(120):  # the server may still be starting
    try:
        client.models.retrieve(model)
        break
    except Exception:
        time.sleep(0.5)
stream = client.chat.completions.create(
    model=model, stream=True, temperature=0, max_tokens=120,
    messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
