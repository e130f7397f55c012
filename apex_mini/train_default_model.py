"""Train the project's shipped default model, `weights/apex-tiny-llama`, from nothing.

Nothing is downloaded: a seeded generator writes simple children's stories (in the spirit of
TinyStories), a sentencepiece tokenizer is trained on them, and a few-million-parameter LLaMA
(`apex_mini.model.LlamaForCausalLM`, grouped-query attention, untied embeddings) learns them on
the CPU under a time budget. The result is saved in Hugging Face layout and checked against
transformers' own LlamaForCausalLM.

    python -m apex_mini.train_default_model                 # ~20 minutes on 2 CPU cores
    python -m apex_mini.train_default_model --quick --out /tmp/tiny   # under a minute, for tests

The file is split by banner comments: story corpus, tokenizer, training, checkpoint, main.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import DEFAULT_MODEL_DIR, ModelConfig
from .model import LlamaForCausalLM

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0


# ============================================================================ options

def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainOptions:
    """Every option of this script; the command-line flags are generated from these fields."""

    out: str = _opt(DEFAULT_MODEL_DIR, "output folder for the Hugging Face checkpoint")
    minutes: float = _opt(20.0, "wall-clock budget for the training loop, in minutes")
    max_steps: int = _opt(0, "stop after this many optimizer steps (0: only the time budget)")
    quick: bool = _opt(False, "tiny corpus, tiny model, a few seconds of training: for tests")
    seed: int = _opt(0, "seed for the corpus, the initial weights and the batch order")
    num_stories: int = _opt(40000, "stories to generate (about 550 characters each)")
    val_fraction: float = _opt(0.02, "share of stories held out for validation")
    vocab_size: int = _opt(2048, "sentencepiece vocabulary size, bytes and specials included")
    hidden_size: int = _opt(256, "model width")
    intermediate_size: int = _opt(688, "SwiGLU hidden width")
    num_hidden_layers: int = _opt(4, "decoder layers")
    num_attention_heads: int = _opt(8, "query heads")
    num_key_value_heads: int = _opt(4, "key/value heads (fewer than query heads: grouped-query)")
    max_position_embeddings: int = _opt(1024, "longest sequence the saved config allows, in tokens")
    seq_len: int = _opt(256, "training sequence length, in tokens")
    batch_size: int = _opt(8, "sequences per optimizer step")
    lr: float = _opt(3e-3, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = _opt(50, "linear warm-up steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this value")
    amp: str = _opt("auto", "bfloat16 autocast while training: auto (when the CPU has native "
                    "bf16), on, off")
    save_dtype: str = _opt("auto", "dtype of the saved weights: auto (float32 if the checkpoint "
                           "fits --max-mb, else bfloat16), float32, bfloat16")
    max_mb: float = _opt(20.0, "size cap for model.safetensors plus tokenizer.model, in MB")
    eval_every: int = _opt(200, "steps between progress evaluations on a slice of the validation set")
    threads: int = _opt(2, "torch CPU threads")

    @classmethod
    def parser(cls, given_only: bool = False) -> argparse.ArgumentParser:
        """One flag per field. given_only: parse to the flags actually typed, no defaults."""
        p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = argparse.SUPPRESS if given_only else f.default
            if f.type in ("bool", bool):
                p.add_argument(flag, action="store_true", default=default, help=f.metadata["help"])
            else:
                kind = {"int": int, "float": float}.get(str(f.type), str)
                p.add_argument(flag, type=kind, default=default, help=f.metadata["help"])
        return p

    def with_quick_defaults(self, explicit: set[str]) -> "TrainOptions":
        """--quick shrinks everything the user did not set explicitly."""
        quick = dict(minutes=0.5, num_stories=1000, vocab_size=600, hidden_size=64,
                     intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, seq_len=128, batch_size=8, warmup_steps=10,
                     eval_every=20, max_steps=40)
        return dataclasses.replace(self, **{k: v for k, v in quick.items() if k not in explicit})


# ============================================================================ story corpus
# Each story is drawn from one of the plots below. A plot is a list of steps; a step is a tuple
# of alternative templates (one is picked), and "|" starts a new paragraph. The slots
# ({H}, {he}, {obj}, ...) are filled once per story, so names, pronouns and articles must agree
# across sentences: the model has to learn that agreement, not a fixed text.

GIRLS = ("Lily Mia Sue Anna Emma Lucy Sara Amy Zoe Ella Rose Kate Jane Molly Daisy Ruby Lola "
         "Nina Ivy Grace Hannah Chloe Sophie Maya Kim Pam Jenny Bella Polly Tina Lisa Mary Olivia "
         "Ava Lucy Clara Alice Julia Eva Sally Rosie Hazel Lena Nora Penny Wendy").split()
BOYS = ("Tom Ben Max Sam Tim Jack Leo Jake Finn Bob Joe Dan Ollie Noah Luke Adam Oscar Henry "
        "Billy Toby Timmy Alex Jim Ned Ray Theo Eli Kevin Peter Ted Mark Paul Nick Charlie "
        "Harry Jacob Lucas Mike Will Zack Arlo Felix Hugo Otto").split()
ANIMALS = ("dog cat bunny bird bear fox mouse duck frog owl pig lamb horse squirrel turtle "
           "monkey puppy kitten cow goat hen deer hedgehog raccoon penguin tiger lion elephant "
           "giraffe zebra bee ladybug dragon").split()
PET_NAMES = ("Spot Fluffy Buddy Whiskers Coco Pip Sunny Bubbles Pepper Rusty Tiny Snowy Nibbles "
             "Hoppy Patch Goldie Ziggy Bingo Fuzzy Lucky Biscuit Peanut Muffin Cookie Toffee "
             "Shadow Button Pickles Waffles Socks Blue Dot Honey Ginger Benny").split()
TRAITS = ("little happy kind brave shy curious silly friendly gentle playful clever small sweet "
          "cheerful funny busy young smart polite lively noisy quiet helpful careful clumsy "
          "sleepy jolly").split()
PARENTS = (("mom", "she"), ("dad", "he"), ("grandma", "she"), ("grandpa", "he"),
           ("mommy", "she"), ("daddy", "he"))
PLACES = (("park", "in"), ("forest", "in"), ("garden", "in"), ("beach", "at"), ("farm", "on"),
          ("pond", "by"), ("lake", "by"), ("playground", "at"), ("meadow", "in"), ("woods", "in"),
          ("river", "by"), ("backyard", "in"), ("hill", "on"), ("zoo", "at"), ("field", "in"),
          ("jungle", "in"), ("village", "in"), ("market", "at"), ("library", "at"),
          ("big tree", "under"), ("castle", "at"), ("snowy hill", "on"), ("pool", "at"))
OBJECTS = ("ball kite doll hat book balloon truck train drum blanket shell crayon umbrella scarf "
           "bucket robot puzzle whistle wagon rocket flag bell spoon cup necklace sock ribbon "
           "marble guitar").split()
OBJECTS += ["teddy bear", "toy car", "toy boat", "music box", "jump rope", "sand pail",
            "rubber duck", "toy plane", "picture book", "snow globe"]
COLORS = ("red blue green yellow pink purple orange brown white black gold silver shiny soft big "
          "small new old pretty tiny fluffy striped spotted").split()
FOODS = ("cookies apples cupcakes sandwiches strawberries muffins pancakes carrots cherries "
         "grapes cakes pies tarts biscuits waffles buns pretzels").split()
ACTIVITIES = (("play tag", "played tag"), ("run in the grass", "ran in the grass"),
              ("jump in puddles", "jumped in puddles"), ("sing songs", "sang songs"),
              ("draw pictures", "drew pictures"), ("build sand castles", "built sand castles"),
              ("climb trees", "climbed trees"), ("pick flowers", "picked flowers"),
              ("look at the clouds", "looked at the clouds"), ("dance", "danced"),
              ("play hide and seek", "played hide and seek"), ("read books", "read books"),
              ("chase butterflies", "chased butterflies"), ("play with blocks", "played with blocks"),
              ("roll down the hill", "rolled down the hill"),
              ("splash in the water", "splashed in the water"), ("ride bikes", "rode bikes"),
              ("make mud pies", "made mud pies"), ("play on the swings", "played on the swings"),
              ("look for bugs", "looked for bugs"), ("throw a ball", "threw a ball"),
              ("play music", "played music"), ("paint pictures", "painted pictures"),
              ("go for walks", "went for walks"), ("count the stars", "counted the stars"),
              ("make funny faces", "made funny faces"), ("skip and hop", "skipped and hopped"),
              ("feed the ducks", "fed the ducks"), ("tell jokes", "told jokes"))
TIMES = ("One day", "One sunny day", "One morning", "One afternoon", "One summer day",
         "One bright morning", "The next day", "One warm day", "On a sunny morning", "One evening",
         "One cold morning", "One windy day", "Last summer", "On Saturday", "One fine day",
         "Early one morning", "After lunch", "One spring day")
GOOD = ("happy", "glad", "proud", "excited", "very happy", "so happy", "joyful", "very proud")
SAD = ("sad", "very sad", "upset", "unhappy", "so sad", "grumpy", "worried", "gloomy")

# (what scares the hero, what the hero then did, how it turned out)
FEARS = (
    ("the big slide", "climbed up the big slide and slid all the way down",
     "It was fast and fun!"),
    ("the deep water", "put {his} feet in the water and began to kick and swim",
     "The water was cool and nice."),
    ("the dark", "turned off the light and closed {his} eyes",
     "The dark was soft and quiet, and soon {he} was asleep."),
    ("the big dog next door", "walked up to the big dog and said hello",
     "The dog wagged its tail and licked {his} hand."),
    ("the tall tree", "climbed up the tall tree, one branch at a time",
     "From the top, {he} could see the whole town."),
    ("the loud thunder", "held {his} {par}'s hand and counted to ten",
     "Soon the storm went away and the sky was blue again."),
)
# (who is in trouble, the trouble, the help, the outcome)
TROUBLES = (
    ("a little bird", "had a hurt wing", "made a soft bed for the bird and gave it some water",
     "After a few days, the bird could fly again."),
    ("a small kitten", "was stuck up in a tree", "got {his} {par} and a ladder, and they helped "
     "the kitten down", "The kitten said, \"Meow!\" and rubbed against {his} legs."),
    ("a baby duck", "could not find its mom", "walked all around the pond with the baby duck",
     "At last they found the mother duck, and the baby duck swam to her."),
    ("a baby turtle", "was stuck on its back", "gently turned the turtle over",
     "The turtle walked slowly back to the water."),
    ("a tiny frog", "was stuck in a jar", "carefully opened the jar",
     "The frog jumped out and said, \"Ribbit!\""),
    ("a little puppy", "was cold and wet in the rain", "wrapped the puppy in {his} {obj_or_blanket}",
     "The puppy stopped shaking and fell asleep."),
)
# (what was found, what the hero did with it, the surprise)
FINDS = (
    ("a big box", "opened the box", "Inside, there were lots of old toys to play with."),
    ("a shiny key", "tried the key in the door of the old shed",
     "The door opened, and inside there was a bike with a big red bow."),
    ("a tiny door at the bottom of a tree", "knocked on the tiny door",
     "A little mouse came out and said, \"Hello! Do you want to have tea?\""),
    ("a big egg in the grass", "watched the egg for a long time",
     "Crack! A baby bird came out and said, \"Peep!\""),
    ("a map under a rock", "followed the map",
     "At the end of the map, there was a box full of shiny stones."),
    ("a bottle with a note inside", "opened the bottle and read the note",
     "The note said, \"Will you be my friend?\""),
)
# (the skill, what went wrong at first, how it finally went)
SKILLS = (
    ("ride a bike", "{he} wobbled and fell down", "{he} pedaled all the way down the street"),
    ("fly a kite", "the kite fell to the ground", "the wind took the kite high into the sky"),
    ("swim", "{he} sank and got water in {his} nose", "{he} kicked {his} legs and swam across the pool"),
    ("jump rope", "the rope got stuck on {his} feet", "{he} jumped ten times in a row"),
    ("tie shoes", "the laces got all tangled", "{he} made two perfect loops"),
    ("catch a ball", "the ball hit {him} on the nose", "{he} caught the ball with both hands"),
)
# (the rule, what the hero did anyway, what went wrong)
WARNINGS = (
    ("do not play ball in the house", "threw {his} ball in the living room",
     "The ball hit a vase, and the vase fell and broke."),
    ("do not go too close to the pond", "went to the edge of the water to look at the fish",
     "{He} slipped and fell into the pond with a big splash!"),
    ("do not eat too many sweets", "ate all the candy in the jar",
     "Soon {his} tummy began to hurt."),
    ("stay close to me at the store", "ran off to look at the toys",
     "When {he} turned around, {his} {par} was gone."),
    ("do not touch the paint", "put {his} hands in the wet paint",
     "Now {his} hands and {his} shirt were all green."),
)
# Scene-setting sentences that fit any outdoor moment; plots mark the spots with "*".
DETAILS = ("The sun was {sun}, and the birds were {birds}.",
           "The sky was blue, and there were {cloud} clouds.",
           "A soft wind blew through the {wind}.", "Butterflies flew from flower to flower.",
           "{H} could hear {sound}.", "It was a {day_adj} day.",
           "There were {flower} flowers everywhere.", "{He} wore {his} {clothes}.",
           "The grass was green and soft.", "{He} skipped along, humming a little song.")
GIFTS = ("a picture", "a card", "a necklace made of beads", "a crown made of flowers",
         "a little clay pot", "a paper boat")
PLANTS = (("a seed", "a big yellow flower"), ("a bean", "a tall bean plant"),
          ("a little seed", "a red tomato"), ("an apple seed", "a small apple tree"),
          ("a pumpkin seed", "a big orange pumpkin"))

PLOTS = {
    "lost": [
        ("{H} had {a_obj} that {he} loved very much.", "{H}'s favorite toy was {his} {obj}.",
         "{H} had {a_obj}. {He} took it everywhere."),
        ("{Time}, {H} took {his} {obj} to the {place}.",
         "{Time}, {H} and {his} {par} went to the {place}, and {H} brought {his} {obj}."),
        "*",
        ("{He} {acted} and had lots of fun.", "{He} played {at_place} all day.",
         "The sun was warm, and {H} was very happy.", ""),
        ("When it was time to go home, {H} could not find {his} {obj}.",
         "But when {he} looked down, {his} {obj} was gone!"),
        "|",
        ('"Oh no! Where is my {obj}?" {H} cried.', '{H} felt {sad}. "I lost my {obj}," {he} said.',
         "{H} was {sad} and began to cry."),
        ('{Helper} said, "Do not worry. We will find it together."',
         '"Let\'s look for it together," said {helper}.'),
        ("They looked under the bushes. They looked behind the trees.",
         "They looked near the swings and by the big rock.", "They looked everywhere."),
        ("At last, {H} saw something under a pile of leaves. It was {his} {obj}!",
         "Then {helper} shouted, \"I see it!\" The {obj} was under a bench.",
         "Then {H} saw {his} {obj} next to a tree. {He} ran to get it."),
        "|",
        ('{H} hugged {his} {obj}. "Thank you, {helper_addr}!" {he} said.',
         "{H} was {good}. {He} held {his} {obj} tight all the way home."),
    ],
    "share": [
        ("{H} had a new {obj}. It was {color} and very nice.",
         "{H} got {a_obj} for {his} birthday. {He} loved it so much."),
        ("{Time}, {he} took it to the {place}.", "{Time}, {he} played with it {at_place}."),
        "*",
        ("{F} saw the {obj} and came over.", "{His} friend {F} came to play."),
        ('"Can I play with your {obj}?" asked {F}.',
         '{F} asked, "Can I have a turn, please?"', '"Wow! Can I try it?" said {F}.'),
        ('But {H} held it close. "No, it is mine!" {he} said.',
         '{H} did not want to share. "No. I want to play with it by myself," {he} said.'),
        ("{F} felt {sad} and walked away.", "{F} looked at the ground and did not say a word."),
        "|",
        ("{H} played alone, but it was not much fun.", "Soon {H} felt lonely."),
        ("{He} thought about {F}. {He} did not like to see {his} friend {sad}.",
         '{His} {par} said, "Toys are more fun when you share them."'),
        ('{H} ran to {F}. "I am sorry. Do you want to play with my {obj} too?" {he} asked.',
         '{H} went to {F} and said, "Here, you can have a turn."'),
        ("{F} smiled a big smile.", '"Thank you!" said {F}, and {fhe} smiled.'),
        ("They played together all day and laughed a lot.",
         "They took turns with the {obj} until the sun went down."),
    ],
    "fear": [
        ("{H} was scared of {fear}.", "There was one thing {H} did not like: {fear}."),
        ("{He} did not want to go near it.", "Every time {he} thought about it, {he} felt small.", ""),
        ("{Time}, {H} and {helper} were {at_place}.", "{Time}, {helper} came to play with {H}."),
        ('{Helper} said, "Do not be afraid. I will be right here with you."',
         '"You can do it," said {helper}. "I know you are brave."'),
        ('{H} took a deep breath. "Okay," {he} said. "I will try."',
         "{H} was still a little scared, but {he} wanted to be brave."),
        "|",
        ("Slowly, {H} {fear_did}.", "So {H} {fear_did}."),
        ("{fear_end}",),
        ('"I did it!" {H} shouted.', '{H} laughed. "That was not scary at all!" {he} said.'),
        ("{Helper} clapped and gave {him} a big hug.", "{He} felt {good} and brave."),
    ],
    "help": [
        ("{Time}, {H} was walking {at_place}.", "{Time}, {H} went for a walk to the {place}."),
        "*",
        ("{He} heard a small sound.", "{He} saw something move near a bush.", ""),
        ("It was {who_trouble}. It {trouble}.", "There was {who_trouble} that {trouble}."),
        ('"Oh, you poor thing," said {H}. "I will help you."',
         '{H} felt {sad} for it. "Don\'t worry, I will help," {he} said.'),
        "|",
        ("{H} {help_did}.", "Very carefully, {H} {help_did}."),
        ("{help_end}",),
        ("{H} smiled. Helping others made {him} feel {good}.",
         "{H} felt warm inside. It was good to help.", "{H} was {good} that {he} could help."),
    ],
    "discovery": [
        ("{H} loved to explore.", "{H} was a very curious {kind}.", ""),
        ("{Time}, {he} went to the {place} to look for something new.",
         "{Time}, {H} and {F} went to play {at_place}."),
        "*",
        ("Under a big tree, {he} found {find}.", "Behind a rock, {H} saw {find}.",
         "Near the path, there was {find}."),
        ('"What is this?" {H} said.', '"Look!" said {H}. "What can it be?"',
         "{H} was very curious."),
        "|",
        ("{He} {find_did}.", "After a while, {H} {find_did}."),
        ("{find_end}",),
        ("{H} could not believe it.", '"Wow!" said {H}.', "{H} jumped up and down."),
        ("{He} ran home to tell {his} {par} all about it.",
         "It was the best day ever.", "{H} would never forget that day."),
    ],
    "baking": [
        ("{Time}, {H} and {his} {par} wanted to make {food}.",
         "{Time}, {H}'s {par} said, \"Let's make some {food} today!\""),
        ('"Yay!" said {H}. "Can I help?"', "{H} was so excited. {He} loved to help in the kitchen."),
        ("They put flour, sugar and eggs in a big bowl.",
         "First, they got a bowl, some flour, some milk and two eggs."),
        ("{H} mixed and mixed.", "{H} stirred the bowl with a big spoon."),
        ("Oops! Some flour went on {his} nose.", "A little milk spilled on the floor.", ""),
        "|",
        ("They put the {food} in the oven and waited.", "Then the {food} went into the hot oven."),
        ("The kitchen smelled so good.", "Soon the whole house smelled sweet."),
        ("When the {food} were ready, {H} took one bite.", "At last, the {food} were done."),
        ('"Yum!" said {H}. "These are the best {food} ever!"', '"Mmm, so good!" said {H}.'),
        ("{He} shared the {food} with {F}, and everyone was {good}.",
         "They gave some {food} to {F} too."),
    ],
    "learn": [
        ("{H} wanted to learn to {skill}.", "{H} wished {he} could {skill} like the big kids."),
        ("{Time}, {he} tried for the first time.", "{Time}, {helper} helped {him} try."),
        ("But {skill_fail}.", "It was hard. {skill_fail_cap}."),
        ('"I can\'t do it," {H} said. {He} felt {sad}.', "{H} wanted to give up."),
        "|",
        ('{Helper} said, "Try again. Everyone falls at first."',
         '"Don\'t give up," said {helper}. "You are getting better."'),
        ("So {H} tried again, and again, and again.", "{H} practiced every day."),
        ("At last, {skill_win}!", "Then one day, {skill_win}!"),
        ('"I did it!" {H} shouted. "I can {skill}!"', "{H} was {good}."),
    ],
    "quarrel": [
        ("{H} and {F} were best friends.", "{H} and {F} liked to play together every day."),
        ("{Time}, they were playing with {a_obj} {at_place}.", "{Time}, they found {a_obj} {at_place}."),
        "*",
        ('"It is my turn!" said {H}.', '"I want it!" said {H}.'),
        ('"No, it is my turn!" said {F}.', '"No, I had it first!" shouted {F}.'),
        ("They both pulled the {obj}.", "They pulled and pulled."),
        ("Rip! The {obj} broke.", "Then, snap! The {obj} broke in two."),
        "|",
        ("{H} and {F} were {sad}. They did not talk.", "Now nobody could play with it."),
        ('After a while, {H} said, "I am sorry, {F}."', '{H} looked at {F}. "I am sorry," {he} said.'),
        ('"I am sorry too," said {F}.', '{F} said, "Me too. Let\'s not fight."'),
        ("Together, they fixed the {obj} with some tape.", "{H}'s {par} helped them fix the {obj}."),
        ("Then they took turns and played happily.", "Soon they were laughing again."),
    ],
    "rain": [
        ("{Time}, {H} wanted to go to the {place}.", "{H} had a plan to {act} {at_place}."),
        ("But when {he} looked out the window, it was raining.",
         "But then dark clouds came, and big drops of rain began to fall."),
        ('"Oh no," said {H}. "Now I can\'t go outside."', "{H} was {sad}. {He} sat by the window."),
        "|",
        ('{Helper} said, "We can have fun inside too!"', "Then {helper} had an idea."),
        ("They built a fort with pillows and blankets.", "They played a game with cards.",
         "They made a puppet show with old socks."),
        ("{H} laughed and forgot all about the rain.", "It was so much fun."),
        "|",
        ("Later, the rain stopped and the sun came out.", "After a while, the sky turned blue again."),
        ("There was a big rainbow in the sky!", "{H} saw a rainbow over the trees."),
        ("{H} ran outside and jumped in the puddles.", '"What a great day," said {H}.'),
    ],
    "race": [
        ("{H} and {F} liked to run.", "{H} was a fast runner, and so was {F}."),
        ('{Time}, {F} said, "Let\'s race to the big tree!"',
         '{Time}, {H} said, "I bet I can run faster than you!"'),
        ('"Ready, set, go!" they shouted.', "They lined up and counted to three."),
        "*",
        ("They ran as fast as they could.", "Off they went across the {place}."),
        ("{H} was in front.", "{H} was winning."),
        "|",
        ("Then {F} tripped on a rock and fell down.", 'Then {H} heard a cry. {F} had fallen down.'),
        ("{H} could win the race, but {he} stopped.", "{H} did not keep running."),
        ('{He} ran back to {F}. "Are you okay?" {he} asked.', "{He} went back and helped {F} up."),
        ('"Thank you," said {F}. "You are a good friend."', "{F} smiled at {him}."),
        ("They walked to the big tree together, hand in hand.",
         "They finished the race together, and they both laughed."),
    ],
    "gift": [
        ("{Time}, {H} found out that it was {his} {par}'s birthday.",
         "It was almost {F}'s birthday, and {H} wanted to give a gift."),
        ("But {H} did not have any money.", "{H} thought and thought about what to give."),
        ("So {he} decided to make {gift}.", "Then {he} had an idea. {He} would make {gift}!"),
        ("{He} worked very hard.", "{He} used glue, paper and lots of colors.",
         "It took a long time, but {he} did not stop."),
        "|",
        ("When it was ready, {H} gave the gift with a big smile.", "At the party, {H} gave {his} gift."),
        ('"I made it just for you," {he} said.', '"Happy birthday!" said {H}.'),
        ('"I love it! It is the best gift ever," came the answer, with a big hug.',
         "Everyone said it was the nicest gift of all."),
        ("{H} felt {good}.", "{H} learned that the best gifts come from the heart."),
    ],
    "warning": [
        ('{His} {par} always said, "{Rule}."', 'One day, {his} {par} told {him}, "Please {rule}."'),
        ("But {H} did not listen.", "{H} nodded, but {he} forgot.",
         "{H} thought it would be okay, just this once."),
        ("{Time}, {he} {rule_did}.", "Later, {he} {rule_did}."),
        ("{rule_end}",),
        "|",
        ('"Oh no!" cried {H}. {He} felt {sad}.', "{H} began to cry."),
        ("{His} {par} came quickly.", "{His} {par} ran to {him}."),
        ('"I am sorry," said {H}. "I should have listened."',
         '{H} said, "I am sorry. I will listen next time."'),
        ('{His} {par} hugged {him}. "It is okay. Now you know why," {parhe} said.',
         "{His} {par} gave {him} a hug and helped {him} clean up."),
    ],
    "new_friend": [
        ("{H} lived in a small house near the {place}.", "{H} had just moved to a new town."),
        ("{He} did not have any friends.", "{He} felt lonely.", "{He} had nobody to play with."),
        ("{Time}, {he} saw {fk_a} {at_place}.", "{Time}, {he} met {fk_a} named {F}."),
        "*",
        ("{H} was shy. {He} did not know what to say.", "{H} wanted to say hello, but {he} was shy."),
        ('Then {F} said, "Hi! I am {F}. Do you want to play?"',
         '{F} walked over and said, "Hello! What is your name?"'),
        "|",
        ('"I am {H}," said {H}. "Yes, I want to play!"', '{H} smiled and said, "My name is {H}."'),
        ("They {acted} together.", "They played all afternoon.", "They {acted} and laughed."),
        ("{H} was not lonely anymore.", "{H} felt {good}."),
        ("From that day on, {H} and {F} were best friends.", "Now {H} had a new best friend."),
    ],
    "garden": [
        ("{Time}, {H}'s {par} gave {him} {seed}.", "{Time}, {H} found {seed} in {his} pocket."),
        ('"Let\'s plant it," said {his} {par}.', "{H} wanted to plant it in the garden."),
        ("{H} dug a little hole and put the seed in it.", "{He} put {seed} in the soil."),
        ("{He} gave it water every day.", "Every morning, {H} watered the soil."),
        "|",
        ("But nothing happened.", "For many days, {he} saw nothing at all."),
        ('"Why is it not growing?" asked {H}.', "{H} was {sad} and wanted to give up."),
        ('"Be patient," said {his} {par}. "Good things take time."',),
        ("Then one morning, {H} saw a tiny green leaf!", "Then one day, a little green sprout came up!"),
        "|",
        ("It grew and grew, and soon there was {plant}.", "After many weeks, it became {plant}."),
        ("{H} was {good}.", '"Look what I grew!" {H} said.'),
    ],
}

MORALS = {
    "lost": ("it is good to take care of your things", "friends help each other"),
    "share": ("sharing is caring", "playing together is more fun than playing alone"),
    "fear": ("it is good to be brave", "trying new things can be fun"),
    "help": ("it is good to help others", "being kind makes everyone happy"),
    "discovery": ("the world is full of surprises",),
    "baking": ("food tastes better when you share it", "working together is fun"),
    "learn": ("you should never give up", "practice makes things easier"),
    "quarrel": ("it is better to share than to fight", "saying sorry can fix a lot of things"),
    "rain": ("you can have fun on any day",),
    "race": ("friends are more important than winning", "being kind is better than winning"),
    "gift": ("the best gifts come from the heart",),
    "warning": ("it is important to listen", "rules keep us safe"),
    "new_friend": ("saying hello can make a new friend",),
    "garden": ("good things take time", "being patient is important"),
}
OPENINGS = (
    "Once upon a time, there was a {trait} {kind} named {H}.",
    "Once upon a time, there was a {trait} {kind} called {H}.",
    "Once upon a time, in a small town, there lived a {trait} {kind} named {H}.",
    "Once there was a {trait} {kind} named {H}.",
    "There once was a {trait} {kind} named {H} who loved to {act}.",
    "{H} was a {trait} {kind}.",
    "One day, a {trait} {kind} named {H} woke up early.",
    "There was once a {kind} named {H}. {He} was very {trait}.",
)
LIKES = ("{He} loved to {act}.", "{He} liked to {act} with {his} friends.",
         "Every day, {he} liked to {act} {at_place}.", "{He} lived with {his} {par} in a little house.",
         "{He} was {age} years old.", "", "")
ENDINGS = (
    "From that day on, {H} was always {good}.", "{H} went to bed with a big smile on {his} face.",
    "And they all lived happily ever after.", "It was a very good day.", "",
)
# Plots whose mood the cheerful endings above would break.
PLOT_ENDINGS = {
    "warning": ("From that day on, {H} always listened to {his} {par}.", "{H} never forgot that day.",
                "The next time, {H} remembered what {his} {par} said.", ""),
    "quarrel": ("{H} and {F} never fought over a toy again.", "They stayed best friends forever.", ""),
}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cast(rng: random.Random) -> dict[str, str]:
    """A hero, a friend, a helper and the props, as template slots."""
    def person():
        if rng.random() < 0.7:
            girl = rng.random() < 0.5
            return rng.choice(GIRLS if girl else BOYS), ("girl" if girl else "boy"), girl
        return rng.choice(PET_NAMES), rng.choice(ANIMALS), rng.random() < 0.5

    H, kind, girl = person()
    F, fkind, fgirl = person()
    while F == H:
        F, fkind, fgirl = person()
    par, parhe = rng.choice(PARENTS)
    place, prep = rng.choice(PLACES)
    obj = rng.choice(OBJECTS)
    if rng.random() < 0.6:
        obj = rng.choice(COLORS) + " " + obj
    act, acted = rng.choice(ACTIVITIES)
    he, him, his = ("she", "her", "her") if girl else ("he", "him", "his")
    s = dict(H=H, kind=kind, he=he, him=him, his=his, F=F, fk=fkind, fk_a=_article(fkind),
             fhe="she" if fgirl else "he", par=par, parhe=parhe, place=place,
             at_place=f"{prep} the {place}", obj=obj, a_obj=_article(obj), act=act, acted=acted,
             food=rng.choice(FOODS), color=rng.choice(COLORS[:7]), trait=rng.choice(TRAITS),
             Time=rng.choice(TIMES), good=rng.choice(GOOD), sad=rng.choice(SAD),
             age=rng.choice(("three", "four", "five", "six", "seven")), gift=rng.choice(GIFTS),
             obj_or_blanket=rng.choice(("blanket", "scarf", "jacket")),
             sun=rng.choice(("shining", "warm", "bright", "high in the sky")),
             birds=rng.choice(("singing", "chirping", "flying high", "singing in the trees")),
             cloud=rng.choice(("big white", "fluffy", "little", "soft white")),
             wind=rng.choice(("trees", "grass", "leaves", "flowers")),
             sound=rng.choice(("the birds singing", "the leaves rustling", "the bees buzzing",
                               "the frogs croaking", "a dog barking far away")),
             day_adj=rng.choice(("lovely", "beautiful", "warm", "bright", "perfect")),
             flower=rng.choice(("red", "yellow", "pink", "purple", "white")),
             clothes=rng.choice(("red boots", "blue coat", "favorite hat", "yellow raincoat",
                                 "new shoes", "green sweater", "striped socks")))
    # The helper is a parent or the friend; templates say {helper} mid-sentence, {Helper} first.
    if rng.random() < 0.5:
        s.update(helper=f"{his} {par}", Helper=f"{his.capitalize()} {par}", helper_addr=par.capitalize())
    else:
        s.update(helper=F, Helper=F, helper_addr=F)
    fear, fear_did, fear_end = rng.choice(FEARS)
    who, trouble, help_did, help_end = rng.choice(TROUBLES)
    find, find_did, find_end = rng.choice(FINDS)
    skill, fail, win = rng.choice(SKILLS)
    rule, rule_did, rule_end = rng.choice(WARNINGS)
    seed, plant = rng.choice(PLANTS)
    s.update(fear=fear, fear_did=fear_did, fear_end=fear_end, who_trouble=who, trouble=trouble,
             help_did=help_did, help_end=help_end, find=find, find_did=find_did, find_end=find_end,
             skill=skill, skill_fail=fail,
             skill_win=win, rule=rule, rule_did=rule_did, rule_end=rule_end, seed=seed, plant=plant)
    s.update(He=he.capitalize(), His=his.capitalize())
    # Slot values may hold slots themselves ("put {his} feet in the water"): fill them in once.
    s = {k: v.format_map(s) for k, v in s.items()}
    s.update(Rule=_cap(s["rule"]), skill_fail_cap=_cap(s["skill_fail"]))
    return s


def write_story(rng: random.Random) -> str:
    """One story: an opening, one plot, an ending. Paragraphs are separated by a blank line."""
    s = _cast(rng)
    plot = rng.choice(list(PLOTS))
    first = [rng.choice(OPENINGS), *rng.sample(LIKES, rng.choice((1, 1, 2)))]
    paragraphs, current = [], first
    for step in PLOTS[plot]:
        if step == "|":
            paragraphs.append(current)
            current = []
        elif step == "*":
            if rng.random() < 0.6:
                current.append(rng.choice(DETAILS))
        else:
            current.append(rng.choice(step))
    ending = [rng.choice(PLOT_ENDINGS.get(plot, ENDINGS))]
    if rng.random() < 0.5:
        ending.append(f"{{H}} learned that {rng.choice(MORALS[plot])}.")
    if rng.random() < 0.3:
        ending.append("The end.")
    if rng.random() < 0.5:
        current += ending
        paragraphs.append(current)
    else:
        paragraphs += [current, ending]
    text = "\n\n".join(" ".join(t for t in p if t) for p in paragraphs if any(p))
    return text.format_map(s)


def build_corpus(num_stories: int, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) stories. Same seed, same stories, on any machine: the generator
    uses nothing but Python's `random.Random`, which is the same on every platform."""
    rng = random.Random(seed)
    stories = [write_story(rng) for _ in range(num_stories)]
    n_val = max(1, round(num_stories * val_fraction))
    return stories[n_val:], stories[:n_val]


# ============================================================================ tokenizer

def train_tokenizer(stories: list[str], vocab_size: int) -> bytes:
    """A Llama-style sentencepiece BPE model (serialized): byte fallback, so any text encodes;
    a dummy prefix space; no normalisation, so decode(encode(text)) == text."""
    import sentencepiece as spm

    # One paragraph per training sentence; "\n" itself is left to byte fallback, as in Llama.
    paragraphs = (p for story in stories for p in story.split("\n\n"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=paragraphs, model_writer=model, model_type="bpe",
        vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        num_threads=2, minloglevel=2)
    return model.getvalue()


def encode_documents(sp, stories: list[str]) -> list[list[int]]:
    """Each story as [BOS] + tokens + [EOS]: the EOS teaches the model to stop."""
    return [[BOS_ID, *ids, EOS_ID] for ids in sp.encode(stories)]


# ============================================================================ training

def init_weights(model: LlamaForCausalLM) -> None:
    """GPT-2 style: N(0, 0.02) everywhere, residual-branch outputs shrunk by sqrt(2 * layers)
    so the residual stream does not grow with depth at initialisation."""
    n_layers = model.config.num_hidden_layers
    residual_out = ("o_proj.weight", "down_proj.weight")
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(residual_out) else 0.02
            torch.nn.init.normal_(p, mean=0.0, std=std)


class DocumentBatches:
    """Training windows of seq_len + 1 tokens that each start at a document's BOS, as prompts do
    at inference; the window runs on into the following documents."""

    def __init__(self, docs: list[list[int]], seq_len: int, batch_size: int, seed: int):
        self.tokens = torch.tensor([t for d in docs for t in d], dtype=torch.long)   # [N]
        starts = torch.tensor([0] + [len(d) for d in docs[:-1]]).cumsum(0)
        self.starts = starts[starts + seq_len + 1 <= len(self.tokens)]                # [num_docs]
        self.offsets = torch.arange(seq_len + 1)                                       # [S+1]
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(len(self.starts), (self.batch_size,), generator=self.gen)
        window = self.tokens[self.starts[pick, None] + self.offsets]                   # [B, S+1]
        return window[:, :-1], window[:, 1:]


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, docs: list[list[int]], batch_size: int = 16) -> tuple[float, int]:
    """Mean negative log-likelihood per predicted token (nats) over whole documents, each read from
    its BOS alone: every token after BOS, the EOS included, is predicted. Returns (nll, tokens)."""
    model.eval()
    max_len = model.config.max_position_embeddings
    docs = sorted((d[:max_len + 1] for d in docs), key=len)
    total, count = 0.0, 0
    for i in range(0, len(docs), batch_size):
        group = docs[i:i + batch_size]
        width = max(len(d) for d in group)
        ids = torch.full((len(group), width), EOS_ID, dtype=torch.long)               # [B, S+1]
        mask = torch.zeros(len(group), width - 1, dtype=torch.bool)                    # [B, S]
        for row, d in enumerate(group):
            ids[row, :len(d)] = torch.tensor(d)
            mask[row, :len(d) - 1] = True
        logits = model.forward_dense(ids[:, :-1])                                      # [B, S, vocab]
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")    # [B, S]
        total += nll[mask].sum().item()
        count += int(mask.sum())
    model.train()
    return total / count, count


def lr_at(opts: TrainOptions, step: int, progress: float) -> float:
    """Linear warm-up over steps, then a cosine over the run's progress (0..1): the schedule is
    tied to the clock, so it ends at the budget however fast this machine is."""
    warm = min(1.0, (step + 1) / opts.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return opts.lr * warm * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * cosine)


def train(model: LlamaForCausalLM, batches: DocumentBatches, val_docs: list[list[int]],
          opts: TrainOptions, use_amp: bool) -> dict:
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=opts.lr, betas=(0.9, 0.95), eps=1e-8)
    budget_s = opts.minutes * 60
    probe = val_docs[:64]
    step, clock, tokens, losses = 0, 0.0, 0, []
    bar = tqdm(total=round(budget_s), unit="s", desc="training", dynamic_ncols=True)
    while True:
        progress = clock / budget_s
        if opts.max_steps:
            progress = max(progress, step / opts.max_steps)
        if progress >= 1.0:
            break
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(opts, step, progress)
        x, y = batches.next()                                                         # [B, S] each
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_amp):
            logits = model.forward_dense(x)                                           # [B, S, vocab]
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        opt.step()
        step += 1
        tokens += x.numel()
        losses.append(loss.item())  # one sync per step is fine here: the step is ~1 s of compute
        dt = time.perf_counter() - t0
        clock += dt
        bar.update(min(round(clock) - bar.n, bar.total - bar.n))
        bar.set_postfix(step=step, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                        lr=f"{opt.param_groups[0]['lr']:.1e}", tok_s=f"{x.numel() / dt:.0f}")
        if step % opts.eval_every == 0:
            nll, _ = evaluate(model, probe)   # off the clock
            bar.write(f"step {step:5d}  train loss {sum(losses[-50:]) / len(losses[-50:]):.3f}  "
                      f"val loss {nll:.3f} nats/token  ({clock:.0f} s, {tokens / 1e6:.2f} M tokens)")
    bar.close()
    return dict(steps=step, seconds=clock, tokens=tokens,
                final_train_loss=sum(losses[-50:]) / max(1, len(losses[-50:])))


@torch.no_grad()
def greedy(model: LlamaForCausalLM, sp, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation with the cache-free forward: slow in general, fine for a tiny model."""
    model.eval()
    ids = [BOS_ID, *sp.encode(prompt)]
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-model.config.max_position_embeddings:]])            # [1, S]
        nxt = int(model.forward_dense(x)[0, -1].argmax())
        if nxt == EOS_ID:
            break
        ids.append(nxt)
    return sp.decode(ids[1:])


# ============================================================================ checkpoint

def hf_config(cfg: ModelConfig) -> dict:
    """config.json as transformers writes it for LlamaForCausalLM (classic field names)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": False, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "pad_token_id": None, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "torch_dtype": cfg.torch_dtype,
    }


def save_checkpoint(model: LlamaForCausalLM, sp_model: bytes, out: Path, dtype: str) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(model.config, torch_dtype=dtype)
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False}, indent=2) + "\n")
    (out / "tokenizer.model").write_bytes(sp_model)
    tensors = {k: v.detach().to(getattr(torch, dtype)).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def load_saved(out: Path) -> LlamaForCausalLM:
    """Our model, rebuilt from the files alone, in float32."""
    from safetensors.torch import load_file

    cfg = ModelConfig.from_hf(out)
    model = LlamaForCausalLM(cfg)
    state = {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def transformers_parity(out: Path, docs: list[list[int]]) -> float:
    """Max |logit difference| between transformers' LlamaForCausalLM and our forward_dense, both
    loaded from the saved files, on two held-out documents."""
    import transformers

    transformers.logging.set_verbosity_error()
    theirs = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ours = load_saved(out)
    n = min(64, *(len(d) for d in docs[:2]))
    ids = torch.tensor([d[:n] for d in docs[:2]])                                    # [2, n]
    return (theirs(input_ids=ids).logits.float() - ours.forward_dense(ids)).abs().max().item()


def write_model_card(out: Path, report: dict) -> None:
    r = report
    parity = "not checked" if r["parity"] is None else f"{r['parity']:.1e}"
    (out / "README.md").write_text(f"""# apex-tiny-llama

The default model of apex_mini: a {r['params'] / 1e6:.2f} M-parameter LLaMA that writes very
simple children's stories. It exists so that the engine, its tests and its benchmarks have a
real checkpoint to run with nothing downloaded: it is no good for anything else.

- Architecture: `LlamaForCausalLM`, {r['layers']} layers, hidden size {r['hidden']},
  {r['heads']} query heads sharing {r['kv_heads']} key/value heads (grouped-query attention),
  SwiGLU width {r['intermediate']}, RoPE theta 10000, untied embeddings, context {r['context']} tokens.
- Weights: {r['dtype']}, {r['weights_mb']:.1f} MB (`model.safetensors`).
- Tokenizer: sentencepiece BPE, {r['vocab']} pieces, byte fallback, BOS = 1, EOS = 2, UNK = 0.
- Corpus: {r['train_stories']} stories ({r['train_mb']:.1f} MB, {r['train_tokens'] / 1e6:.2f} M tokens)
  written by a seeded procedural generator in `apex_mini/train_default_model.py` (TinyStories-like:
  named children and animals, places, objects, dialogue, a small plot, an ending or a moral).
  {r['val_stories']} further stories ({r['val_tokens']} tokens) are held out.
- Training: AdamW, cosine learning rate with warm-up, bfloat16 autocast: {r['amp']},
  {r['steps']} steps of {r['batch']} x {r['seq_len']} tokens ({r['seen_tokens'] / 1e6:.1f} M tokens)
  in {r['train_s'] / 60:.1f} min; the whole script took {r['total_s'] / 60:.1f} min.
- Held-out perplexity: **{r['ppl']:.3f}** per token ({r['nll']:.4f} nats/token).
- transformers parity: max |logit difference| {parity} against `transformers.LlamaForCausalLM`
  on held-out text, both loading these files in float32.
- Trained on: {r['machine']}, {r['date']}.

Reproduce (deterministic corpus and tokenizer; the weights depend on how many steps fit the
time budget):

    {r['command']}

Greedy samples:

""" + "\n".join(f"> {s}".replace("\n", "\n> ") + "\n" for s in r["samples"]))


# ============================================================================ main

PROMPTS = ("Once upon a time", "One day, a little", "Lily and Ben went to the park.")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    opts = TrainOptions(**vars(TrainOptions.parser().parse_args(argv)))
    if opts.quick:
        opts = opts.with_quick_defaults(set(vars(TrainOptions.parser(given_only=True).parse_args(argv))))
    if opts.amp not in ("auto", "on", "off") or opts.save_dtype not in ("auto", "float32", "bfloat16"):
        raise SystemExit("--amp takes auto|on|off and --save-dtype auto|float32|bfloat16")
    import platform

    import sentencepiece as spm

    t_start = time.perf_counter()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    out = Path(opts.out)

    train_stories, val_stories = build_corpus(opts.num_stories, opts.val_fraction, opts.seed)
    train_mb = sum(len(s) for s in train_stories) / 1e6
    print(f"corpus: {len(train_stories)} training stories ({train_mb:.1f} MB), "
          f"{len(val_stories)} held out")
    sp_model = train_tokenizer(train_stories, opts.vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    train_docs, val_docs = encode_documents(sp, train_stories), encode_documents(sp, val_stories)
    train_tokens = sum(len(d) for d in train_docs)
    print(f"tokenizer: {sp.vocab_size()} pieces; {train_tokens / 1e6:.2f} M training tokens "
          f"({train_mb * 1e6 / train_tokens:.2f} chars/token)")

    cfg = ModelConfig(
        vocab_size=sp.vocab_size(), hidden_size=opts.hidden_size,
        intermediate_size=opts.intermediate_size, num_hidden_layers=opts.num_hidden_layers,
        num_attention_heads=opts.num_attention_heads, num_key_value_heads=opts.num_key_value_heads,
        head_dim=opts.hidden_size // opts.num_attention_heads,
        max_position_embeddings=opts.max_position_embeddings, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model = LlamaForCausalLM(cfg)
    init_weights(model)
    params = sum(p.numel() for p in model.parameters())
    use_amp = opts.amp == "on" or (opts.amp == "auto" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    print(f"model: {params / 1e6:.2f} M parameters; bf16 autocast {'on' if use_amp else 'off'}")

    batches = DocumentBatches(train_docs, opts.seq_len, opts.batch_size, opts.seed)
    stats = train(model, batches, val_docs, opts, use_amp)
    nll, val_tokens = evaluate(model, val_docs)
    ppl = math.exp(nll)
    print(f"held-out perplexity: {ppl:.3f} per token ({nll:.4f} nats/token over {val_tokens} tokens)")

    fits_fp32 = params * 4 + len(sp_model) <= opts.max_mb * 1e6
    dtype = opts.save_dtype if opts.save_dtype != "auto" else ("float32" if fits_fp32 else "bfloat16")
    save_checkpoint(model, sp_model, out, dtype)
    try:
        parity = transformers_parity(out, val_docs)
    except ImportError:   # transformers is an optional dependency of apex_mini
        parity = None
        print("transformers parity: skipped (transformers is not installed)")
    else:
        print(f"transformers parity: max |logit difference| {parity:.2e} (must be < 1e-4)")
        if parity >= 1e-4:
            raise SystemExit(f"saved checkpoint disagrees with transformers by {parity:.2e}")

    saved = load_saved(out)   # samples from the saved weights, as users will see them
    samples = [greedy(saved, sp, p, 60 if opts.quick else 250) for p in PROMPTS]
    for s in samples:
        print("-" * 72 + "\n" + s)
    report = dict(
        params=params, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
        intermediate=cfg.intermediate_size, context=cfg.max_position_embeddings, dtype=dtype,
        weights_mb=(out / "model.safetensors").stat().st_size / 1e6, vocab=sp.vocab_size(),
        train_stories=len(train_stories), train_mb=train_mb, train_tokens=train_tokens,
        val_stories=len(val_stories), val_tokens=val_tokens, amp="on" if use_amp else "off",
        steps=stats["steps"], batch=opts.batch_size, seq_len=opts.seq_len,
        seen_tokens=stats["tokens"], train_s=stats["seconds"], ppl=ppl, nll=nll, parity=parity,
        machine=f"{platform.machine()} {torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        date=time.strftime("%Y-%m-%d"), samples=samples,
        command="python -m apex_mini.train_default_model " + shlex.join(argv))
    report["total_s"] = time.perf_counter() - t_start
    write_model_card(out, report)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    print("saved " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()) + f" in {out}")
    print(f"total time {report['total_s'] / 60:.1f} min")
    return report


if __name__ == "__main__":
    main()
