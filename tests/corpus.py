"""Test-only: a small Chinese corpus and a tiny CPM-shaped vocab trained on it.

`train_test_vocab(path)` trains, in about a second, a sentencepiece model with the special
pieces at the CPM-1 ids (see cpmgen.tokenizer.SPECIAL_PIECES), on CORPUS prepared exactly
as CPMTokenizer.encode prepares text (jieba words, spaces/newlines mapped, space-joined);
the training itself is cpmgen.vocab.train_cpm_vocab, shared with tools/train_tiny.py.
"""

from __future__ import annotations

import os
from pathlib import Path

CORPUS = """\
第一章 雨夜

那天夜里下着很大的雨，街上几乎没有行人。林晓撑着一把旧伞，站在公交车站的屋檐下，看着路灯把雨丝照成一根根银线。
她已经等了四十分钟，末班车还是没有来。手机只剩下 12% 的电量，屏幕上显示着晚上 11:45。
“你还要等多久？”一个低沉的声音从身后传来。
林晓回过头，看见一个穿着灰色风衣的年轻人，手里拿着一本《百年孤独》，书页已经被雨水打湿了。
“我也不知道，”她说，“也许车不会来了。”
年轻人笑了笑，说：“那我们一起走吧，前面路口有一家24小时的便利店，可以先躲躲雨。”

第二章 旧城

老城区的巷子又窄又长，两边是青砖灰瓦的房子。清晨的时候，卖豆浆、油条、包子的小摊最先热闹起来，空气里飘着葱花和芝麻的香味。
王师傅在这条巷子里修了三十年的自行车。他常说，一辆车就像一个人，哪里不舒服，听声音就知道。
孩子们放学以后喜欢围在他的摊子旁边，看他用扳手拧螺丝，用砂纸打磨生锈的链条。
有一年冬天，巷口搬来了一户新人家。那家的女儿叫小雨，十岁，会拉小提琴，每天傍晚都在窗前练习。
琴声不算好听，有时候还会跑调，可是整条巷子的人都愿意听。王师傅说，这声音让他想起年轻时候的自己。

第三章 远方

火车穿过山洞，又驶上一座长长的铁桥。窗外是一望无际的田野，金黄的稻谷在风里起伏，像大海的波浪。
陈默把耳机摘下来，听见邻座的老人正在给孙子讲故事。故事里有一只迷路的小狐狸，它翻过了九座山，渡过了七条河，终于找到了回家的路。
“后来呢？”孩子问。
“后来啊，它长大了，又离开了家，去看更远的地方。”老人说。
陈默忽然觉得，自己就是那只狐狸。五年前他离开家乡，到北京读书，后来在上海工作，换了三次房子，认识了很多人，也告别了很多人。
他打开笔记本电脑，新建了一个文档，在第一行写下：Hello, world. 然后又删掉，改成：我想回家看看。

第四章 信

亲爱的阿明：
见字如面。这里的春天来得很晚，四月了，山上还有积雪。学校的条件比想象中还要艰苦，教室的窗户漏风，孩子们的手冻得通红，可是他们读书的声音特别响亮。
我教三年级的语文和数学，一共有 27 个学生。最小的叫阿朵，才八岁，每天要走两个小时的山路来上学。
昨天下课的时候，她送给我一朵野花，说老师你笑起来真好看。我转过身去，偷偷地哭了。
你问我什么时候回来，我也说不清楚。也许明年，也许更久。这里需要我，我也需要这里。
祝好！
小雪
2019年4月18日

歌词一 《晚风》

晚风轻轻吹过我的脸
吹散了昨天的思念
你说过的那些誓言
还回荡在我的耳边
我们走过的那条街
路灯还是一样的亮
只是身边少了一个你
让我不敢再回头望

副歌：
啦啦啦 啦啦啦
把心事唱给月亮听
如果有一天你回来
我还在老地方等你

歌词二 《少年》

我是一个追梦的少年
背着吉他走遍了天边
不怕风雨不怕路太远
心中有光就能看见
Oh yeah 我们一起唱
Oh yeah 唱到天亮
青春是一首没有结尾的歌
每一句都是我们的模样

第五章 夏天

那年夏天特别热，知了在树上不停地叫。我们几个人骑着车去河边游泳，水很凉，阳光很亮，天空蓝得像一块玻璃。
小胖总是第一个跳进水里，溅起很高的水花。阿杰喜欢躺在石头上晒太阳，嘴里叼着一根狗尾巴草。
我记得那天下午，我们比赛谁能在水里憋气最久。小胖憋了 45 秒，阿杰憋了 52 秒，我只憋了 30 秒就浮上来了，大家笑得前仰后合。
傍晚回家的路上，天边的晚霞红得像火，我们一边骑车一边大声唱歌，歌声飘得很远很远。
后来我们都长大了，各自去了不同的城市。小胖开了一家小饭馆，阿杰成了一名医生，而我，坐在电脑前，写下这些字。
有时候我会想，如果时间可以倒流，我愿意再回到那个夏天，再听一次知了的叫声。

第六章 会议

周一上午九点，公司召开了季度总结会议。张经理打开 PPT，说本季度的销售额比去年同期增长了 15.8%，新用户超过 3000 人。
“但是，”他停顿了一下，“我们的问题也很明显：产品更新太慢，客户反馈的 bug 还有 120 多个没有修复。”
技术部的小李举手说，团队正在用 Python 重写后台系统，预计下个月可以上线。
会议结束的时候已经是中午了。大家走出会议室，有人去食堂吃饭，有人继续对着电脑敲代码。
窗外的天空很晴朗，一架飞机慢慢地飞过，留下一道白色的痕迹。
"""


def train_test_vocab(path: str | os.PathLike, vocab_size: int = 1000, byte_fallback: bool = False) -> Path:
    """Train a tiny CPM-shaped sentencepiece vocab on CORPUS and write it to `path`.

    Ids 0..10 are `<unk> <s> </s> ▃ <sep> <pad> <mask> <eod> ▁ <unused9> ▂`, as in
    chinese_vocab.model. Deterministic; about a second."""
    from cpmgen.vocab import train_cpm_vocab

    # each line keeps its "\n" so the vocab learns U+2583 in context, as encode() sees it
    return train_cpm_vocab(CORPUS.splitlines(keepends=True), path, vocab_size, byte_fallback=byte_fallback)
