"""Built-in prompts for the demo project: varied tasks a small assistant model can attempt."""

from __future__ import annotations

DEMO_GUIDELINES = """\
# How to judge

Read the prompt, then both responses. Prefer the response that **answers the question**,
is **correct**, **clear** and **safe**. Length is not a virtue in itself.

- **Much better**: one response is clearly usable and the other is not.
- **Better**: both are usable, one is noticeably better.
- **Tie**: you cannot honestly prefer one.
- **Both bad**: neither answers acceptably.

Flag anything unsafe or containing personal data, whatever your preference.
"""

DEMO_PROMPTS: list[str] = [
    "What is the capital of Australia?",
    "Explain photosynthesis to a ten-year-old in three sentences.",
    "Write a haiku about autumn rain.",
    "Give me three tips for staying focused while studying.",
    "What is the difference between weather and climate?",
    "Translate 'Good morning, how are you?' into French.",
    "Write a Python function that returns the factorial of n.",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot in a children's story.",
    "How many legs does a spider have?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the three states of matter?",
    "Write a short thank-you note to a teacher.",
    "What does HTTP stand for?",
    "Give me a simple recipe for scrambled eggs.",
    "What is 15% of 80? Show your work.",
    "Name three renewable sources of energy.",
    "Explain what a black hole is in simple terms.",
    "Write a limerick about a cat who loves cheese.",
    "What is the boiling point of water at sea level in Celsius?",
    "How do I reverse a list in Python?",
    "What are some good ways to reduce stress?",
    "Describe the color blue to someone who cannot see.",
    "What is the largest planet in our solar system?",
    "Write a two-line slogan for a bicycle shop.",
    "Explain the difference between a virus and a bacterium.",
    "What should I pack for a one-day hike?",
    "Who wrote 'Pride and Prejudice'?",
    "Give an example of a metaphor and explain it.",
    "What is the Pythagorean theorem?",
    "How can I politely decline an invitation?",
    "Write a SQL query that counts the rows in a table named users.",
    "What causes the seasons on Earth?",
    "Suggest three books for someone who likes mystery novels.",
    "What is the chemical symbol for gold?",
    "Explain what an API is to a non-programmer.",
    "Write a short motivational message for someone starting a new job.",
    "Why do leaves change color in the fall?",
    "How many continents are there, and what are they?",
    "What is a prime number? Give three examples.",
    "Write a four-line poem about the ocean.",
    "What is the difference between 'affect' and 'effect'?",
    "How does a refrigerator keep food cold?",
    "Give me a fun fact about octopuses.",
    "What is the speed of light, approximately?",
    "Explain recursion with a simple example.",
    "What are the primary colors?",
    "How do I make a cup of green tea?",
    "Write a one-sentence story about a lost key.",
    "Is it safe to look directly at the sun? Why or why not?",
    "What is machine learning, in one paragraph?",
    "Give two arguments for and two against school uniforms.",
    "How do vaccines help the body fight disease?",
    "Rewrite this sentence to be more formal: 'gonna be late, sorry'.",
    "What is the tallest mountain on Earth?",
]
