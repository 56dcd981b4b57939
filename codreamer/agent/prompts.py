"""Prompts of the outreach agent.

Kept deliberately short: the policy is a 135M model with a small context, and the tool
schemas are rendered into the prompt as well. The prospect's facts are NOT in the prompt;
the agent has to look them up with the tools (see `codreamer.agent.tools`).
"""

from __future__ import annotations

from openai.types.chat import ChatCompletionMessageParam

from codreamer.domain import Product, Prospect

NUDGE_MESSAGE = "Call finalize_email with subject and body."


def system_prompt(product: Product) -> str:
    """The SDR role, the tool workflow and the few rules the email must follow."""
    # The value props are left out on purpose: every token here is paid for in every
    # turn's prompt, in sampling and again in the GRPO step (the one-liner is in the task).
    return (
        f"You are {product.sender_name}, {product.sender_title}. "
        "Write a first outreach email to one prospect.\n"
        "1. Call lookup_prospect and lookup_company to get the facts.\n"
        "2. Call finalize_email with subject and body.\n"
        "Rules: under 120 words; greet the prospect by first name; cite the company's recent news "
        f"and one pain point; ask for {product.call_to_action}; sign as {product.sender_name}. "
        "Use only facts from the tools."
    )


def user_message(prospect: Prospect, product: Product) -> str:
    """The task: who to write to (name, id, company) and what we sell (one-liner)."""
    return (
        f"Prospect: {prospect.full_name} (prospect_id {prospect.prospect_id}) at {prospect.company.name}.\n"
        f"Product: {product.name}: {product.one_liner}\n"
        "Look up the facts, then call finalize_email."
    )


def initial_messages(prospect: Prospect, product: Product) -> list[ChatCompletionMessageParam]:
    """System prompt + first user message, the start of every episode."""
    return [
        {"role": "system", "content": system_prompt(product)},
        {"role": "user", "content": user_message(prospect, product)},
    ]
