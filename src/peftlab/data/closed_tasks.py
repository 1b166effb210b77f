"""Closed tasks with held-out phrasings: the recipe suite's data (benchmarks/recipes.py).

Each task maps a prompt to an answer computed by the code below, so exact match is a fair score.
The training split and the held-out split use *different phrasings* (and different slot values),
so a model that scores on the held-out split has learnt the task, not memorised the prompts:

    builtin:codes         a customer message -> its answer code (classification into 12 codes)
    builtin:multicode     a message with two requests -> both codes in order, joined by "; "
    builtin:zh-numbers    an integer 0..999 -> its Chinese numerals (e.g. 105 -> 一百零五)

``builtin:<task>`` is the training split and ``builtin:<task>/heldout`` the held-out one (for
``data.eval_path``). Everything is generated deterministically from fixed seeds.
"""

from __future__ import annotations

import random

from .formats import Conversation

# code -> (train phrasings, held-out phrasings); {item} and {order} are filled from the slot lists
INTENTS = {
    "RFD-17": (["I want my money back for the {item}.", "Please refund my order {order}.",
                "How do I get a refund for the {item} I bought?", "Can I have a refund on {order}?"],
               ["The {item} was not what I expected, I'd like to be reimbursed.",
                "Return the payment for order {order} to my card, please."]),
    "SHP-04": (["Where is my order {order}?", "My {item} has not arrived yet.",
                "When will order {order} be delivered?", "Can you track the {item} I ordered?"],
               ["It has been two weeks and still no sign of the {item}.",
                "Any update on the delivery status of {order}?"]),
    "PWD-22": (["I forgot my password.", "How do I reset my password?",
                "I can't log in, my password doesn't work.", "Please send me a password reset link."],
               ["My login credentials are rejected and I need new ones.",
                "The sign-in page keeps saying my passphrase is wrong."]),
    "CNL-09": (["Cancel my order {order}.", "I don't want the {item} anymore, please cancel it.",
                "Can I still cancel order {order}?", "Please stop the order for the {item}."],
               ["Scrap order {order}, I changed my mind.",
                "Call off the purchase of the {item} before it ships."]),
    "DMG-31": (["The {item} arrived broken.", "My {item} is damaged.",
                "Order {order} came with a cracked {item}.", "The box was crushed and the {item} is broken."],
               ["There's a dent and a scratch all over the {item} I received.",
                "The {item} in {order} was smashed during shipping."]),
    "ADR-12": (["I need to change my delivery address.", "Please update the shipping address for {order}.",
                "Can I send order {order} to a different address?", "I moved, how do I change my address?"],
               ["Ship {order} to my office instead of my home.",
                "The street on my account is outdated and must be corrected."]),
    "INV-05": (["I need an invoice for order {order}.", "Can you send me the receipt for the {item}?",
                "Where can I download my invoice?", "Please email the bill for {order}."],
               ["My accountant wants a tax document for the {item} purchase.",
                "I require proof of payment for {order}."]),
    "WRN-28": (["Is the {item} still under warranty?", "How long is the warranty on the {item}?",
                "Does the warranty cover my {item}?", "I want to make a warranty claim for the {item}."],
               ["My {item} stopped working after eight months, is that covered?",
                "What guarantee comes with the {item}?"]),
    "PAY-16": (["My payment failed.", "Why was my card declined for {order}?",
                "I was charged twice for the {item}.", "The payment for order {order} didn't go through."],
               ["The checkout rejected my credit card again.",
                "I see a duplicate transaction on my statement for {order}."]),
    "STK-03": (["Is the {item} in stock?", "When will the {item} be available again?",
                "Do you have the {item} right now?", "The {item} says sold out, when is the restock?"],
               ["Can I buy a {item} today or is inventory empty?",
                "Notify me when the {item} is back on the shelves."]),
    "DSC-40": (["Do you have a discount code?", "My coupon doesn't work for the {item}.",
                "Is there a sale on the {item}?", "How do I apply a promo code to {order}?"],
               ["The voucher I got by email is refused at checkout.",
                "Any cheaper price for the {item} this week?"]),
    "ACC-08": (["Please delete my account.", "How do I close my account?",
                "I want to remove all my data and my account.", "Deactivate my account, please."],
               ["Erase my profile from your service for good.",
                "I'd like to unsubscribe permanently and have my user record removed."]),
}
ITEMS_TRAIN = "laptop headphones blender jacket phone charger backpack lamp kettle watch camera chair".split()
ITEMS_HELDOUT = "tablet toaster sneakers monitor speaker umbrella".split()
OPENERS_TRAIN = ["", "Hi, ", "Hello. ", "Good morning! ", "Hey there, ", "Quick question: "]
OPENERS_HELDOUT = ["", "Dear support team, ", "Excuse me, "]
CLOSERS_TRAIN = ["", " Thanks.", " Thank you!", " Regards, Sam", " Cheers"]
CLOSERS_HELDOUT = ["", " Best wishes.", " Appreciate it."]
CONNECTORS_TRAIN = [" Also, ", " And ", " Another thing: "]
CONNECTORS_HELDOUT = [" Besides that, ", " On top of that, "]
ZH_DIGITS = "零一二三四五六七八九"
ZH_TRAIN = ["把{n}写成中文数字。", "{n}用中文数字怎么写？", "请把数字{n}写成汉字。"]
ZH_HELDOUT = ["数字{n}的中文写法是什么？", "用汉字表示{n}。"]


def chinese_number(n: int) -> str:
    """0..999 in Chinese numerals: 7 -> 七, 15 -> 十五, 105 -> 一百零五, 110 -> 一百一十."""
    if not 0 <= n <= 999:
        raise ValueError(n)
    if n < 10:
        return ZH_DIGITS[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return ("" if tens == 1 else ZH_DIGITS[tens]) + "十" + ("" if ones == 0 else ZH_DIGITS[ones])
    hundreds, rest = divmod(n, 100)
    head = ZH_DIGITS[hundreds] + "百"
    if rest == 0:
        return head
    if rest < 10:
        return head + "零" + ZH_DIGITS[rest]
    return head + ("一" if rest < 20 else "") + chinese_number(rest)


def _message(rng: random.Random, code: str, heldout: bool) -> str:
    phrasing = rng.choice(INTENTS[code][1 if heldout else 0])
    item = rng.choice(ITEMS_HELDOUT if heldout else ITEMS_TRAIN)
    order = f"#{rng.randint(10000, 99999)}"
    return phrasing.format(item=item, order=order)


def _lower_first(text: str) -> str:
    return text if text.startswith(("I ", "I'")) else text[0].lower() + text[1:]


def _dressed(rng: random.Random, text: str, heldout: bool) -> str:
    """The message with an opener and a closer (each split's own), as people write them."""
    opener = rng.choice(OPENERS_HELDOUT if heldout else OPENERS_TRAIN)
    closer = rng.choice(CLOSERS_HELDOUT if heldout else CLOSERS_TRAIN)
    return (opener + _lower_first(text) if opener.endswith(", ") else opener + text) + closer


def codes_pairs(heldout: bool, n: int) -> list[tuple[str, str]]:
    rng = random.Random(7 + heldout)
    codes = sorted(INTENTS)
    out = []
    for i in range(n):
        code = codes[i % len(codes)]
        out.append((f"Give the answer code for this customer message: {_dressed(rng, _message(rng, code, heldout), heldout)}", code))
    return out


def multicode_pairs(heldout: bool, n: int) -> list[tuple[str, str]]:
    rng = random.Random(17 + heldout)
    codes = sorted(INTENTS)
    out = []
    for _ in range(n):
        a, b = rng.sample(codes, 2)
        joiner = rng.choice(CONNECTORS_HELDOUT if heldout else CONNECTORS_TRAIN)
        text = _dressed(rng, _message(rng, a, heldout) + joiner + _lower_first(_message(rng, b, heldout)), heldout)
        out.append((f"List the answer codes for this customer message, in order: {text}", f"{a}; {b}"))
    return out


def zh_number_pairs(heldout: bool, n: int) -> list[tuple[str, str]]:
    """Numbers split by value (a held-out number never appears in training), phrasings split too."""
    numbers = list(range(1000))
    random.Random(27).shuffle(numbers)
    pool = numbers[:200] if heldout else numbers[200:]
    rng = random.Random(29 + heldout)
    phrasings = ZH_HELDOUT if heldout else ZH_TRAIN
    return [(rng.choice(phrasings).format(n=k), chinese_number(k)) for k in pool[:n]]


TASKS = {"codes": (codes_pairs, 180, 90), "multicode": (multicode_pairs, 300, 90),
         "zh-numbers": (zh_number_pairs, 400, 90)}


def closed_task_conversations(name: str) -> list[Conversation] | None:
    """``codes``, ``codes/heldout``, ... as conversations; None for a name that is not a closed task."""
    task, _, split = name.partition("/")
    if task not in TASKS or split not in ("", "heldout"):
        return None
    make, n_train, n_heldout = TASKS[task]
    heldout = split == "heldout"
    pairs = make(heldout, n_heldout if heldout else n_train)
    return [Conversation([{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                         f"builtin:{name} record {i}") for i, (p, a) in enumerate(pairs)]
