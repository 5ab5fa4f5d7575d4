"""A small templated voice-assistant intent data set, generated in code: standard phrasing and one user's own.

There is no intent corpus on disk, so sentences are built from templates and slot values with a seeded generator
(the same seed gives the same sentences). The "base" phrasing is how most people ask an assistant ("set an alarm
for 7 am", "call mum"). The "user" speaks their own way, with their own names for times, people, places and
playlists, and verbs borrowed from other intents: "ring me at the crack of dawn" is an alarm, "take me to the gym
mix" is music, "can i cut the grass this arvo" is the weather, "bell our kid" is a call, "shout gaz tea's on" is
a text. A classifier trained on the base phrasing (all-MiniLM-L6-v2 features + a head) reads about half of the
user's sentences wrong; the user's sentences are what on-device personalization learns from.

Templates are shared between a split's train and test halves (a user keeps their habits), slot fillings are drawn
without repeats, and no sentence appears in two splits. The module needs only the standard library.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from itertools import product

from ..errors import ConfigError

__all__ = ["INTENTS", "IntentSplit", "IntentSplits", "load_intent_splits"]

INTENTS = ("set_alarm", "play_music", "get_weather", "call_contact", "navigate", "send_message")

_SLOTS: dict[str, tuple[str, ...]] = {
    "time": ("7 am", "6:30", "half past six", "8 o'clock", "noon", "5:45 am", "9 pm", "quarter to seven",
             "10:15", "6 am", "midnight", "7:20"),
    "day": ("tomorrow", "on monday", "on friday", "every weekday", "on saturday", "tonight", "this sunday"),
    "artist": ("taylor swift", "the beatles", "coldplay", "adele", "daft punk", "queen", "miles davis",
               "radiohead", "beyonce", "abba", "ed sheeran", "oasis", "elvis", "drake"),
    "genre": ("jazz", "rock", "classical", "hip hop", "country", "techno", "reggae", "blues", "folk", "metal",
              "soul", "indie"),
    "city": ("paris", "london", "tokyo", "berlin", "new york", "madrid", "leeds", "sydney", "dublin", "rome"),
    "contact": ("mum", "dad", "john", "sarah", "the office", "grandma", "peter", "my sister", "alex", "emma",
                "the dentist", "mike", "my boss", "lucy"),
    "place": ("the airport", "the station", "work", "the nearest petrol station", "the city centre",
              "the gym", "the supermarket", "the hospital", "the beach", "the library",
              "the museum", "my hotel", "the post office", "the stadium"),
    "msg": ("i'm running late", "see you soon", "dinner is ready", "call me back", "happy birthday",
            "i'm on my way", "don't forget the milk", "the meeting moved to three"),
    # The user's own words: times of day, names for people, places, playlists and errands.
    "when": ("the crack of dawn", "early doors", "the usual time", "school run time", "half six", "silly o'clock",
             "first light", "my shift", "brekkie time", "the bin men", "the early train", "the dog's walk"),
    "nick": ("our kid", "nana", "the gaffer", "big j", "auntie pat", "gaz", "the missus", "shaz", "our dave",
             "uncle mo", "the lads", "bev"),
    "haunt": ("the usual", "nana's", "the big shop", "gaz's place", "the match", "the chippy", "the allotment",
              "the caravan", "the local", "the offy", "our dave's", "the lock up"),
    "mix": ("the gym mix", "the sunday stuff", "the car songs", "dad's old records", "the rainy day list",
            "the 90s bangers", "the kitchen disco", "the chill list", "the wedding tunes", "nana's favourites",
            "the road trip list", "the study beats"),
    "chore": ("hang the washing out", "do the school run on foot", "cut the grass", "go for a run",
              "have a barbecue", "walk the dog", "wear shorts", "cycle in", "take the boat out", "dry the sheets",
              "paint the fence", "sit in the garden"),
    "later": ("later", "this arvo", "at the weekend", "tomorrow", "after tea", "in the morning"),
    "note": ("tea's on", "running behind", "back by six", "grab some milk", "game's off", "on me way",
             "ring you later", "kettle's on", "stuck in traffic", "bring the keys"),
}

_BASE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "set_alarm": ("set an alarm for {time}", "set an alarm for {time} {day}", "wake me up at {time}",
                  "please set my alarm to {time} {day}", "create an alarm at {time}", "i need an alarm at {time}",
                  "alarm for {time} {day} please", "can you wake me up at {time} {day}"),
    "play_music": ("play {artist}", "play some {genre} music", "put on some {genre}", "i want to listen to {artist}",
                   "start playing {artist}", "play songs by {artist}", "can you play {genre} music",
                   "shuffle my {genre} playlist"),
    "get_weather": ("what's the weather in {city}", "what is the weather like {day}", "will it rain in {city}",
                    "will it rain {day}", "weather forecast for {city} {day}", "how hot is it in {city}",
                    "is it going to be sunny {day}", "what's the temperature in {city}"),
    "call_contact": ("call {contact}", "phone {contact}", "dial {contact}", "give {contact} a call",
                     "make a call to {contact}", "can you call {contact}", "start a phone call with {contact}",
                     "call {contact} on speaker"),
    "navigate": ("navigate to {place}", "directions to {place}", "how do i get to {place}", "take me to {place}",
                 "show me the route to {place}", "find the fastest way to {place}", "start navigation to {place}",
                 "how far is {place} from here"),
    "send_message": ("text {contact} {msg}", "send a message to {contact} saying {msg}",
                     "message {contact} that {msg}", "send {contact} a text saying {msg}",
                     "write to {contact} {msg}", "send an sms to {contact}: {msg}", "text {contact} that {msg}",
                     "tell {contact} by text {msg}"),
}

# One user's habits: their own names for times, people, places and playlists, and verbs that borrow other
# intents' words on purpose ("ring me" / "give me a bell" set an alarm, "take me to" / "call up" a playlist plays
# it, "tell me if i can" asks the weather, "shout" sends a text), so the base phrasing points the wrong way.
_USER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "set_alarm": ("ring me at {when}", "give me a bell at {when} {later}", "call me at {when} to get up",
                  "don't let me sleep past {when}", "shout me at {when}", "get me up for {when} {later}"),
    "play_music": ("take me to {mix}", "call up {mix}", "fire up the box with {mix}", "send {mix} to the box",
                   "give me {mix} {later}", "box on, {mix}"),
    "get_weather": ("can i {chore} {later}", "tell me if i can {chore} {later}", "is it safe to {chore} {later}",
                    "will i get soaked if i {chore}", "brolly check before i {chore}", "any good to {chore} {later}"),
    "call_contact": ("bell {nick}", "give {nick} a bell", "get {nick} on the blower", "put me through to {nick}",
                     "blower, {nick}", "i need a word with {nick}"),
    "navigate": ("beam me to {haunt}", "drop me at {haunt}", "get me to {haunt} sharpish", "which way for {haunt}",
                 "sat nav {haunt}", "how long till {haunt}"),
    "send_message": ("shout {nick} {note}", "let {nick} know {note}", "ping {nick} {note}",
                     "drop {nick} a line, {note}", "tell {nick} {note}", "shout the group {note}"),
}


@dataclass(frozen=True)
class IntentSplit:
    """Sentences and their intent ids (indices into `INTENTS`)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class IntentSplits:
    """Standard phrasing (the base model's data) and the user's phrasing, each cut into train and test."""

    base_train: IntentSplit
    base_test: IntentSplit
    user_train: IntentSplit
    user_test: IntentSplit


def _all_sentences(template: str) -> list[str]:
    """Every sentence a template makes, one per combination of the slot values it uses."""
    names = re.findall(r"{(\w+)}", template)
    return [template.format(**dict(zip(names, values))) for values in product(*(_SLOTS[n] for n in names))]


def _sentences(templates: dict[str, tuple[str, ...]], per_intent: int, rng: random.Random) -> list[tuple[str, int]]:
    """`per_intent` distinct sentences per intent: the templates take turns, each giving a random unused filling."""
    out = []
    for label, intent in enumerate(INTENTS):
        pools = [rng.sample(options, len(options)) for options in map(_all_sentences, templates[intent])]
        if sum(map(len, pools)) < per_intent:
            raise ConfigError(f"{intent}: the templates make only {sum(map(len, pools))} sentences, fewer than "
                             f"{per_intent}; ask for fewer or add slot values")
        chosen: list[str] = []
        while len(chosen) < per_intent:
            for pool in pools:
                if pool and len(chosen) < per_intent:
                    chosen.append(pool.pop())
        out += [(text, label) for text in chosen]
    rng.shuffle(out)
    return out


def _halves(pairs: list[tuple[str, int]], train_share: float) -> tuple[IntentSplit, IntentSplit]:
    """Stratified: the first `train_share` of each intent's sentences train, the rest test; order is kept."""
    per_label = [sum(1 for _, y in pairs if y == label) for label in range(len(INTENTS))]
    taken = [0] * len(INTENTS)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for text, label in pairs:
        (train if taken[label] < round(per_label[label] * train_share) else test).append((text, label))
        taken[label] += 1
    return (IntentSplit(tuple(t for t, _ in train), tuple(y for _, y in train)),
            IntentSplit(tuple(t for t, _ in test), tuple(y for _, y in test)))


def load_intent_splits(base_per_intent: int = 90, user_per_intent: int = 60, base_train_share: float = 2 / 3,
                       user_train_share: float = 0.6, seed: int = 0) -> IntentSplits:
    """Base phrasing (train/test) and the user's phrasing (train/test); every intent in every split."""
    for name, share in (("base_train_share", base_train_share), ("user_train_share", user_train_share)):
        if not 0.0 < share < 1.0:
            raise ConfigError(f"{name} must be in (0, 1), got {share!r}; e.g. 0.6 trains on 60% of the sentences")
    rng = random.Random(seed)
    base_train, base_test = _halves(_sentences(_BASE_TEMPLATES, base_per_intent, rng), base_train_share)
    user_train, user_test = _halves(_sentences(_USER_TEMPLATES, user_per_intent, rng), user_train_share)
    return IntentSplits(base_train, base_test, user_train, user_test)
