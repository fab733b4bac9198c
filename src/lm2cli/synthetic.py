"""Deterministic synthetic text and tasks: prose generators, passkey documents, chat SFT data, preference pairs.

Pure Python (no torch, no downloads): every function takes a `random.Random` (or a seed) and returns the
same output for the same seed, so the examples corpus, tests and later stages can regenerate their data.

Public functions (signatures other stages rely on):

    zh_paragraph(rng, topic=None, sentences=(3, 5)) -> str
    zh_document(rng, topic=None, paragraphs=(3, 6), title=True) -> str
        Natural-looking Simplified Chinese prose (science, history, cooking, travel, economy, technology,
        education, health, environment, sports, art); passes lm2's zh rule filters at defaults.
    en_paragraph(rng, topic=None, sentences=(3, 6)) -> str
    en_document(rng, topic=None, paragraphs=(3, 6), title=True) -> str
        English counterpart.
    TOPICS: tuple[str, ...]

    passkey_document(rng, n_chars=None, n_tokens=None, depth=None, key=None, count_tokens=None,
                     filler="grass") -> dict
        Landmark/YaRN-style passkey sample (SPEC §9.2): task line, filler sized to n_chars (or n_tokens
        with `count_tokens(text) -> int`), the key line "The pass key is NNNNN. Remember it. NNNNN is the
        pass key." at relative `depth` in [0, 1] (random if None), closing question "What is the pass
        key? The pass key is". filler="grass" repeats the classic paragraph, "zh"/"en" use the prose
        generators. Returns {"text", "prompt", "answer" (str), "key" (int), "depth", "n_chars"}; "text"
        is prompt + " " + answer + "." for pretraining mixes.

    chat_examples(rng, n, tools_fraction=0.1, kinds=("add", "sub", "mul", "copy", "reverse", "kv")) -> list[dict]
        ChatML conversations {"messages": [{"role", "content"[, "name"]}], "task", "answer"} with a
        checkable answer (`answer` is the exact final assistant string). A `tools_fraction` share call a
        calculator plugin: the assistant turn holds
        "<|action_start|><|plugin|>\n{json}<|action_end|>", then an `environment` turn (name "plugin")
        returns the result, then the assistant answers.
    render_chatml(messages) -> str
        InternLM2 ChatML text: "<|im_start|>{role}[ name={name}]\n{content}<|im_end|>\n" per turn.
    check_answer(example, text) -> bool
        True if `text` (a model's reply) carries the example's answer.

    preference_pairs(rng, n, conditions=("brief", "detailed", "default")) -> list[dict]
        Conditional preference pairs for COOL RLHF: {"condition", "system", "prompt", "chosen",
        "rejected", "answer"}. Under `brief` the correct short answer beats the correct answer with
        working; under `detailed` the opposite; under `default` a correct answer beats a wrong one.
    CONDITION_PROMPTS: dict[str, str]   the system prompt of each condition
"""

from __future__ import annotations

import json
import random
from typing import Callable, Iterable, Optional

# ---------------------------------------------------------------------------------------------------
# Chinese prose

_ZH_TIMES = ["近年来", "在过去的十年里", "二十世纪以来", "上个世纪末", "早在明清时期", "进入新世纪以后", "最近几年",
             "在很长一段时间里", "今天", "从去年开始", "每到春天", "在冬季", "改革开放以后", "在工业革命之后"]
_ZH_PLACES = ["北京", "上海", "广州", "杭州", "成都", "西安", "南京", "武汉", "长沙", "昆明", "青岛", "苏州", "厦门",
              "哈尔滨", "兰州", "乌鲁木齐", "拉萨", "大连", "重庆", "天津", "江南地区", "西北地区", "沿海城市",
              "许多乡村", "一些发达国家", "东南亚", "欧洲", "南美洲"]
_ZH_ROLES = ["研究人员", "学者", "专家", "工程师", "历史学家", "经济学家", "老师", "学生", "厨师", "游客", "当地居民",
             "医生", "记者", "政府部门", "企业家", "年轻人", "老年人", "家长", "设计师", "农民"]
_ZH_CONN = ["因此", "不过", "同时", "此外", "然而", "事实上", "总的来说", "换句话说", "与此同时", "另一方面", "可以说",
            "值得注意的是", "一般来说", "在这种情况下"]

_ZH_TOPICS = {
    "science": dict(
        S=["量子力学", "基因编辑技术", "暗物质", "气候模型", "新型材料", "天文观测", "细胞分裂", "光合作用",
           "地震预测", "化学反应", "引力波", "纳米技术", "生物多样性", "海洋环流"],
        O=["实验数据", "科学理论", "观测结果", "自然规律", "研究方法", "测量精度", "理论模型", "物理常数",
           "实验设备", "基础研究"],
        V=["研究", "观察", "测量", "验证", "解释", "分析", "模拟", "探索"],
        A=["精确", "复杂", "基础", "前沿", "系统", "严谨", "微观", "宏观"],
        T=["科学家在实验室中反复{V}{S}，希望找到更加{A}的解释。",
           "一项发表在国际期刊上的研究显示，{S}与{O}之间的关系比人们想象的要复杂得多。",
           "为了{V}{S}，{R}设计了一套新的实验装置，并记录了大量的{O}。",
           "在{P}的一所大学里，{R}正在利用计算机{V}{S}的变化过程。",
           "很多人以为{S}离日常生活很远，其实它和我们每天使用的手机、药物都有关系。",
           "科学的进步往往来自对{O}的重新审视，而不是简单地重复已有的结论。",
           "如果没有长期的{O}积累，{S}的研究很难取得突破。",
           "这一发现不仅改变了人们对{S}的认识，也为{O}提供了新的思路。"]),
    "history": dict(
        S=["丝绸之路", "科举制度", "唐朝的对外交流", "宋代的城市生活", "郑和下西洋", "四大发明", "长城的修建",
           "大运河", "敦煌石窟", "古代书院", "商周青铜器", "秦朝的统一", "明代的海禁", "古代驿站"],
        O=["历史文献", "考古发现", "社会结构", "文化交流", "经济发展", "地方志", "出土文物", "古代典籍",
           "民间传说", "制度变迁"],
        V=["记载", "研究", "考证", "保存", "整理", "还原", "讨论", "梳理"],
        A=["悠久", "丰富", "独特", "重要", "深远", "珍贵", "繁荣", "古老"],
        T=["根据{O}的记载，{S}在当时产生了{A}的影响。",
           "{R}通过对{O}的考证，逐渐还原了{S}的真实面貌。",
           "在{P}出土的一批文物，为研究{S}提供了{A}的实物证据。",
           "{S}并不是一夜之间形成的，它经历了几百年的演变。",
           "许多关于{S}的故事在民间流传，其中有些内容并不完全可靠。",
           "历史学家指出，理解{S}必须把它放在当时的社会背景中去看。",
           "{S}的兴衰，反映了古代国家在{O}方面的得与失。",
           "今天我们走进博物馆，仍然能够感受到{S}留下的{A}遗产。"]),
    "cooking": dict(
        S=["红烧肉", "麻婆豆腐", "小笼包", "清蒸鱼", "番茄炒蛋", "宫保鸡丁", "酸辣汤", "饺子", "炸酱面", "回锅肉",
           "糖醋排骨", "凉拌黄瓜", "蛋炒饭", "桂花糕"],
        O=["火候", "调料", "食材", "刀工", "酱油", "生姜", "葱花", "米醋", "花椒", "高汤", "白糖"],
        V=["准备", "腌制", "翻炒", "炖煮", "调味", "蒸制", "切配", "品尝"],
        A=["鲜嫩", "香浓", "清淡", "酥脆", "地道", "家常", "爽口", "软糯"],
        T=["做{S}的关键在于掌握{O}，时间太长或太短都会影响口感。",
           "先把{O}洗干净，切成小块，再用少量的盐和料酒{V}十分钟。",
           "很多家庭都会做{S}，但每一家的味道都不完全一样。",
           "锅里的油烧热以后，放入{O}和{O2}，小火炒出香味。",
           "{P}的{R}做{S}时，喜欢多放一点{O}，味道更加{A}。",
           "出锅之前尝一尝咸淡，如果觉得味道不够，可以再加一点{O}。",
           "一道{A}的{S}，往往需要耐心和经验，而不是复杂的工具。",
           "这道菜做好以后最好趁热吃，放凉了口感会差很多。"]),
    "travel": dict(
        S=["古镇", "国家公园", "海边小城", "雪山", "草原", "博物馆", "老街", "湖泊", "峡谷", "寺庙", "夜市",
           "沙漠", "森林步道", "温泉"],
        O=["交通", "住宿", "门票", "路线", "天气", "当地美食", "风景", "行李", "导游", "景区"],
        V=["参观", "游览", "拍摄", "体验", "规划", "预订", "漫步", "探访"],
        A=["安静", "热闹", "美丽", "壮观", "古朴", "宜人", "独特", "难忘"],
        T=["去{P}的{S}旅行，最好提前{V}{O}，节假日的人会特别多。",
           "清晨的{S}非常{A}，很多游客会早早起床拍摄日出。",
           "如果时间充裕，可以在{P}多住两天，慢慢体验当地的生活节奏。",
           "当地的{R}告诉我们，秋天是游览{S}最好的季节。",
           "沿着小路走上半个小时，就能看到一片{A}的{S}。",
           "出发之前要关注{O}的变化，山区的天气常常说变就变。",
           "这次旅行让我们对{P}有了新的认识，也留下了许多{A}的回忆。",
           "晚上回到住处，大家一边品尝{O}，一边讨论第二天的计划。"]),
    "economy": dict(
        S=["数字经济", "消费市场", "制造业", "乡村振兴", "对外贸易", "小微企业", "物流行业", "新能源汽车",
           "房地产市场", "服务业", "跨境电商", "农业现代化", "金融科技", "旅游经济"],
        O=["市场需求", "就业机会", "产业结构", "投资规模", "居民收入", "生产成本", "价格水平", "政策支持",
           "供应链", "技术创新"],
        V=["推动", "促进", "调整", "分析", "支持", "优化", "提升", "扩大"],
        A=["稳定", "快速", "持续", "灵活", "显著", "健康", "合理", "长期"],
        T=["{T}，{S}在{P}得到了{A}的发展，带动了大量的{O}。",
           "{R}认为，{S}的增长主要依靠{O}和{O2}的共同作用。",
           "根据统计数据，去年{S}的规模增长了百分之{N}。",
           "面对不断变化的{O}，许多企业开始{V}自己的经营策略。",
           "{S}的发展离不开{O}，也需要良好的营商环境。",
           "一些地方通过{V}{O}，让{S}成为新的经济增长点。",
           "从长期来看，{S}仍然面临着{O}不足的问题。",
           "专家提醒，在{V}{S}的同时，也要注意防范可能出现的风险。"]),
    "technology": dict(
        S=["人工智能", "大语言模型", "云计算", "移动支付", "自动驾驶", "物联网", "芯片设计", "开源软件",
           "数据中心", "机器翻译", "搜索引擎", "智能手机", "网络安全", "语音识别"],
        O=["训练数据", "计算资源", "算法", "用户体验", "隐私保护", "硬件成本", "软件生态", "系统架构",
           "网络带宽", "模型参数"],
        V=["开发", "训练", "部署", "改进", "测试", "评估", "优化", "设计"],
        A=["高效", "可靠", "智能", "开放", "安全", "通用", "稳定", "灵活"],
        T=["{T}，{S}的发展速度远远超出了很多人的预期。",
           "为了{V}更加{A}的系统，{R}需要同时考虑{O}和{O2}。",
           "{S}已经进入了普通人的生活，从购物到出行都能看到它的身影。",
           "{P}的一家公司最近发布了新的{S}产品，引起了广泛关注。",
           "{S}的效果在很大程度上取决于{O}的质量。",
           "有人担心{S}会带来新的问题，例如{O}和就业方面的挑战。",
           "开源社区的参与，让{S}的门槛不断降低。",
           "在{V}{S}的过程中，团队发现{O}才是真正的瓶颈。"]),
    "education": dict(
        S=["课堂教学", "职业教育", "在线课程", "阅读习惯", "高考制度", "学前教育", "教师培训", "双语教学",
           "课外活动", "终身学习", "科学教育", "劳动教育", "家庭教育", "大学招生"],
        O=["学习兴趣", "教学质量", "课程设计", "考试成绩", "师资力量", "教育资源", "学习方法", "学生负担",
           "评价体系", "创新能力"],
        V=["培养", "提高", "改革", "关注", "引导", "鼓励", "完善", "探索"],
        A=["全面", "均衡", "有效", "多样", "扎实", "开放", "灵活", "公平"],
        T=["{R}普遍认为，{S}的核心是{V}学生的{O}。",
           "在{P}的一些学校，{S}已经成为日常教学的一部分。",
           "良好的{O}并不是一天养成的，需要学校和家庭共同努力。",
           "{T}，{S}的形式发生了很大的变化，但教育的目标没有改变。",
           "一位有经验的老师说，{O}比单纯的分数更加重要。",
           "如何在减轻{O}的同时提高{O2}，是很多学校面临的难题。",
           "通过{V}{S}，学生们有了更多动手实践的机会。",
           "教育公平的关键，在于让每个孩子都能获得{A}的{O}。"]),
    "health": dict(
        S=["睡眠质量", "体育锻炼", "饮食结构", "心理健康", "慢性疾病", "口腔卫生", "疫苗接种", "颈椎问题",
           "营养均衡", "体检", "视力保护", "高血压", "压力管理", "作息规律"],
        O=["免疫力", "生活习惯", "身体状况", "蔬菜水果", "运动时间", "医疗条件", "健康意识", "心理压力",
           "膳食纤维", "饮水量"],
        V=["改善", "预防", "保持", "关注", "调节", "控制", "增强", "检查"],
        A=["规律", "适度", "健康", "科学", "良好", "充足", "均衡", "合理"],
        T=["医生建议，每天保持{A}的{S}，有助于{V}{O}。",
           "很多人忽视了{S}，直到出现问题才开始重视。",
           "研究表明，{O}和{S}之间存在着明显的联系。",
           "{P}的一家医院开设了专门的门诊，帮助患者{V}{S}。",
           "养成{A}的{O}，比依靠药物更加重要。",
           "如果长时间感到疲劳，应该及时去医院{V}一下身体。",
           "老年人尤其需要注意{S}，适当增加{O}的摄入。",
           "{R}提醒大家，不要轻信网络上关于{S}的各种偏方。"]),
    "environment": dict(
        S=["垃圾分类", "空气污染", "森林保护", "水资源", "湿地生态", "节能减排", "野生动物", "塑料污染",
           "土壤修复", "沙漠化", "海洋保护", "城市绿化", "碳排放", "可再生能源"],
        O=["生态环境", "自然资源", "污染物", "绿色出行", "环保意识", "生物栖息地", "能源消耗", "排放标准",
           "回收利用", "气候变化"],
        V=["保护", "治理", "减少", "监测", "恢复", "推广", "改善", "限制"],
        A=["可持续", "清洁", "绿色", "严格", "长期", "脆弱", "宝贵", "显著"],
        T=["{T}，{P}在{S}方面投入了大量资金，{O}得到了明显改善。",
           "{S}不仅是政府的责任，也需要每一个人的参与。",
           "{R}通过长期监测发现，{O}的变化与人类活动密切相关。",
           "为了{V}{S}，当地制定了更加{A}的管理办法。",
           "减少一次性用品的使用，是{V}{O}最简单的方法之一。",
           "湖边重新出现了成群的候鸟，这说明{S}的效果正在显现。",
           "如果不及时{V}，{S}带来的损失将很难挽回。",
           "越来越多的年轻人选择{O}，用实际行动支持{S}。"]),
    "sports": dict(
        S=["马拉松", "乒乓球", "足球联赛", "篮球比赛", "游泳", "羽毛球", "登山运动", "冬季运动", "围棋比赛",
           "田径训练", "全民健身", "自行车运动", "武术", "跳绳"],
        O=["体能", "技术动作", "训练计划", "比赛经验", "团队配合", "心理素质", "运动装备", "观众", "教练",
           "场地设施"],
        V=["参加", "训练", "观看", "组织", "推广", "报名", "坚持", "指导"],
        A=["激烈", "精彩", "艰苦", "专业", "业余", "稳定", "顽强", "出色"],
        T=["{T}，{S}在{P}越来越受欢迎，吸引了大量{R}参与。",
           "教练认为，{S}不仅考验{O}，也考验{O2}。",
           "这场{A}的比赛一直持续到最后一分钟才分出胜负。",
           "为了准备{S}，运动员们每天都要{V}好几个小时。",
           "很多业余爱好者通过{S}结识了新朋友。",
           "{P}新建了一批体育场馆，为{S}提供了更好的{O}。",
           "比赛结束后，观众们久久不愿离开，为运动员的{A}表现鼓掌。",
           "科学的{O}可以帮助运动员减少受伤的风险。"]),
    "art": dict(
        S=["水墨画", "书法", "京剧", "民间剪纸", "古典音乐", "现代舞", "雕塑", "摄影艺术", "话剧", "刺绣",
           "陶瓷艺术", "诗歌朗诵", "昆曲", "油画"],
        O=["艺术风格", "传统技艺", "创作灵感", "观众", "作品", "表现手法", "文化内涵", "审美趣味", "舞台",
           "色彩"],
        V=["创作", "欣赏", "传承", "展示", "表演", "学习", "收藏", "临摹"],
        A=["细腻", "典雅", "生动", "朴素", "大胆", "含蓄", "优美", "独特"],
        T=["{S}讲究{O}，一笔一画都体现了作者的功力。",
           "在{P}举办的展览上，观众可以近距离{V}{S}的代表作品。",
           "{R}认为，{S}的魅力在于它{A}的{O}。",
           "为了{V}{S}，一些年轻人拜老艺人为师，一学就是好几年。",
           "{T}，{S}逐渐走出国门，被更多外国朋友所了解。",
           "好的{S}作品，往往能够在{O}和{O2}之间找到平衡。",
           "演出结束以后，台下响起了长时间的掌声。",
           "{S}不仅是一门技艺，更承载着丰富的{O}。"]),
}

_ZH_GENERAL = [
    "{T}，{P}的{R}开始关注{S}对{O}的影响。",
    "从{P}的经验来看，{S}并不是一个孤立的问题，它和{O}、{O2}之间存在着密切的联系。",
    "许多{R}认为，{A}的{S}能够在很大程度上改善{O}。",
    "{C}，{S}的意义不仅在于眼前的效果，还在于它对未来的影响。",
    "我们在{P}采访了几位{R}，他们对{S}有着不同的看法。",
    "有的人觉得{S}很简单，也有人认为其中有很多值得研究的地方。",
    "{C}，只有把{O}和{O2}结合起来，才能真正理解{S}。",
    "这个问题看起来很小，但是如果处理不好，就会影响到{O}。",
    "{R}在接受采访时表示，{S}的关键是要有耐心。",
    "随着时间的推移，人们对{S}的理解也在不断加深。",
    "在讨论{S}的时候，我们常常忽略了{O}的作用。",
    "{C}，{S}的发展既有机遇，也有挑战。",
    "如果把{S}比作一棵大树，那么{O}就是它的根。",
    "不同地区的情况差别很大，所以{S}不能简单地照搬别人的做法。",
    "据了解，{P}已经有{N}多家单位参与了相关工作。",
    "对于普通人来说，了解一些关于{S}的知识是很有必要的。",
    "{C}，{R}和{R2}之间的交流也变得越来越频繁。",
    "这些变化看似微小，却在潜移默化中改变着我们的生活。",
    "回顾过去，我们可以发现{S}走过了一条并不平坦的道路。",
    "展望未来，{S}还有很大的发展空间。",
    "一位来自{P}的{R}说：“我们做的事情虽然普通，但是很有意义。”",
    "{C}，关于{S}的争论从来没有停止过。",
    "在这个过程中，{O}起到了非常重要的作用。",
    "为了让更多的人了解{S}，{R}编写了一本通俗易懂的小册子。",
    "值得一提的是，{S}在{P}的实践已经取得了初步的成果。",
    "有数据显示，大约百分之{N}的受访者对{S}表示关心。",
    "我们应该用发展的眼光来看待{S}，既不要过分乐观，也不要过于悲观。",
    "很多年以前，{P}的{R}就已经注意到了{S}的价值。",
    "{C}，对{O}的重视程度决定了{S}能走多远。",
    "这并不意味着{S}没有缺点，相反，它仍然需要不断完善。",
    "正如一位{R}所说，任何进步都离不开踏踏实实的工作。",
    "当我们谈论{S}的时候，其实也是在谈论我们自己的生活方式。",
]

_ZH_TITLES = ["浅谈{S}", "关于{S}的几点思考", "{S}：过去、现在与未来", "走近{S}", "{P}的{S}", "{S}与{O}",
              "从{O}看{S}", "{S}的{A}之美", "我眼中的{S}", "{S}入门"]

TOPICS = tuple(_ZH_TOPICS)


def _fill(rng: random.Random, template: str, vocab: dict) -> str:
    def pick(key: str) -> str:
        return rng.choice(vocab[key])

    out = template
    for slot, key in (("{S}", "S"), ("{O2}", "O"), ("{O}", "O"), ("{V}", "V"), ("{A}", "A")):
        while slot in out:
            out = out.replace(slot, pick(key), 1)
    for slot, pool in (("{T}", _ZH_TIMES), ("{P}", _ZH_PLACES), ("{R2}", _ZH_ROLES), ("{R}", _ZH_ROLES),
                       ("{C}", _ZH_CONN)):
        while slot in out:
            out = out.replace(slot, rng.choice(pool), 1)
    while "{N}" in out:
        out = out.replace("{N}", str(rng.randint(3, 95)), 1)
    return out


def _zh_templates(topic: str) -> list[str]:
    return _ZH_TOPICS[topic]["T"] + _ZH_GENERAL


def zh_paragraph(rng: random.Random, topic: Optional[str] = None, sentences=(3, 5),
                 _pool: Optional[list] = None, _vocab: Optional[dict] = None) -> str:
    topic = topic or rng.choice(TOPICS)
    vocab = _vocab or _ZH_TOPICS[topic]
    # A document shares one pool, so no template repeats inside it; a lone paragraph gets its own.
    pool = _pool if _pool is not None else rng.sample(_zh_templates(topic), len(_zh_templates(topic)))
    n = rng.randint(*sentences)
    return "".join(_fill(rng, pool.pop(), vocab) for _ in range(min(n, len(pool))))


def zh_document(rng: random.Random, topic: Optional[str] = None, paragraphs=(3, 6), title: bool = True) -> str:
    """A Chinese article: optional title line, then paragraphs; no template repeats inside a document."""
    topic = topic or rng.choice(TOPICS)
    vocab = _focused(rng, _ZH_TOPICS[topic])
    pool = rng.sample(_zh_templates(topic), len(_zh_templates(topic)))
    paras = [zh_paragraph(rng, topic, _pool=pool, _vocab=vocab) for _ in range(rng.randint(*paragraphs))]
    paras = [p for p in paras if p]
    if title:
        paras.insert(0, _fill(rng, rng.choice(_ZH_TITLES), dict(vocab, S=vocab["S"][:1])))
    return "\n".join(paras)


def _focused(rng: random.Random, vocab: dict) -> dict:
    # A document keeps coming back to one or two subjects, as real articles do.
    focus = rng.sample(vocab["S"], 2)
    return dict(vocab, S=[focus[0]] * 4 + [focus[1]] * 2 + vocab["S"])


# ---------------------------------------------------------------------------------------------------
# English prose

_EN_TOPICS = {
    "science": dict(S=["quantum mechanics", "gene editing", "dark matter", "climate models", "new materials",
                       "cell division", "photosynthesis", "gravitational waves", "ocean currents"],
                    O=["experimental data", "the theory", "careful measurement", "the laboratory", "field work"]),
    "history": dict(S=["the Silk Road", "the printing press", "medieval trade fairs", "the Grand Canal",
                       "ancient libraries", "the age of sail", "early universities", "Roman roads"],
                    O=["old letters", "the archives", "archaeological finds", "local records", "the chronicles"]),
    "cooking": dict(S=["slow-cooked stew", "fresh bread", "a simple soup", "roasted vegetables", "dumplings",
                       "tomato sauce", "fried rice", "a fruit tart"],
                    O=["the heat", "good ingredients", "the seasoning", "a sharp knife", "patience"]),
    "travel": dict(S=["the old town", "a national park", "a small harbour", "the mountain villages",
                      "the night market", "a quiet lake", "the coastal road", "the desert"],
                   O=["the weather", "local buses", "a good map", "the guesthouse", "the morning light"]),
    "economy": dict(S=["small businesses", "the housing market", "global trade", "local farming",
                       "the digital economy", "public transport", "renewable energy", "the labour market"],
                    O=["consumer demand", "interest rates", "wages", "investment", "the supply chain"]),
    "technology": dict(S=["language models", "cloud computing", "open source software", "mobile payments",
                          "self-driving cars", "data centres", "speech recognition", "network security"],
                       O=["training data", "the hardware", "user privacy", "the software stack", "compute"]),
    "education": dict(S=["reading habits", "vocational training", "online courses", "science teaching",
                         "school libraries", "lifelong learning", "homework", "teacher training"],
                      O=["the classroom", "curiosity", "good teachers", "exam results", "practice"]),
    "health": dict(S=["sleep", "regular exercise", "a balanced diet", "mental health", "dental care",
                      "blood pressure", "stress", "daily routines"],
                   O=["the immune system", "habits", "fresh vegetables", "a doctor", "rest"]),
    "environment": dict(S=["recycling", "air quality", "forest protection", "clean water", "wetlands",
                           "plastic waste", "wild birds", "city parks"],
                        O=["the ecosystem", "local volunteers", "energy use", "the climate", "the river"]),
    "sports": dict(S=["the marathon", "table tennis", "the football league", "swimming", "cycling",
                      "mountain climbing", "chess tournaments", "track and field"],
                   O=["training", "the coach", "the crowd", "stamina", "team spirit"]),
    "art": dict(S=["ink painting", "calligraphy", "opera", "paper cutting", "classical music", "sculpture",
                   "photography", "embroidery"],
                O=["the artist", "tradition", "the audience", "colour", "the museum"]),
}
_EN_PLACES = ["Lisbon", "Kyoto", "Nairobi", "Oslo", "Chengdu", "Lima", "Toronto", "Hanoi", "Edinburgh", "Cairo",
              "Melbourne", "Krakow", "a small village", "the northern provinces", "many coastal towns"]
_EN_ROLES = ["researchers", "teachers", "engineers", "historians", "economists", "doctors", "local residents",
             "students", "travellers", "farmers", "journalists", "volunteers", "designers", "parents"]
_EN_TIMES = ["In recent years", "Over the last decade", "Since the early twentieth century", "Every spring",
             "For a long time", "Today", "In the past", "Last year", "During the winter months"]
_EN_GENERAL = [
    "{T}, {R} in {P} have paid close attention to {S}.",
    "Many {R} believe that {S} depends on {O} more than on anything else.",
    "It is easy to think of {S} as a simple matter, but the details tell a different story.",
    "When we asked {R} in {P} about {S}, their answers were surprisingly varied.",
    "The history of {S} shows that progress is rarely a straight line.",
    "One reason is that {O} changes slowly, while expectations change quickly.",
    "A visit to {P} makes this clear: {S} looks very different there.",
    "{T}, the debate about {S} has become more practical and less abstract.",
    "Nobody has a complete answer, yet the questions themselves are worth asking.",
    "In practice, {S} works best when {O} is taken seriously from the start.",
    "Some {R} were sceptical at first, but the results convinced most of them.",
    "There is still a lot that we do not understand about {S}.",
    "The lesson from {P} is that small, steady steps matter more than grand plans.",
    "According to one survey, about {N} percent of {R} said they cared about {S}.",
    "This does not mean that {S} has no problems; it simply means they can be solved.",
    "A teacher from {P} put it simply: \"You learn it by doing it, again and again.\"",
    "Looking ahead, {S} will probably change in ways that are hard to predict.",
    "What matters most is that {O} and {O2} are considered together.",
    "The same pattern appears in other places, from {P} to {P2}.",
    "Critics point out that {S} is often described with more enthusiasm than evidence.",
    "Even so, the basic idea is sound and has been tested many times.",
    "For ordinary people, the effect of {S} is felt mostly through {O}.",
    "That is why {R} keep returning to the question of {S} every few years.",
    "The details vary, but the principle remains the same.",
    "If there is one thing to remember, it is that {O} cannot be rushed.",
    "Several {R} described how their view of {S} changed over time.",
    "The numbers are modest, but they are moving in the right direction.",
    "It would be a mistake to ignore the role of {O} in all of this.",
]
_EN_TITLES = ["Notes on {S}", "A short guide to {S}", "What {R} say about {S}", "{S} in {P}",
              "Rethinking {S}", "Why {S} matters"]


def _en_fill(rng: random.Random, template: str, vocab: dict) -> str:
    out = template
    for slot, pool in (("{S}", vocab["S"]), ("{O2}", vocab["O"]), ("{O}", vocab["O"]), ("{P2}", _EN_PLACES),
                       ("{P}", _EN_PLACES), ("{R}", _EN_ROLES), ("{T}", _EN_TIMES)):
        while slot in out:
            out = out.replace(slot, rng.choice(pool), 1)
    while "{N}" in out:
        out = out.replace("{N}", str(rng.randint(3, 95)), 1)
    return out[0].upper() + out[1:]


def en_paragraph(rng: random.Random, topic: Optional[str] = None, sentences=(3, 6), _pool=None,
                 _vocab: Optional[dict] = None) -> str:
    topic = topic or rng.choice(TOPICS)
    vocab = _vocab or _EN_TOPICS[topic]
    pool = _pool if _pool is not None else rng.sample(_EN_GENERAL, len(_EN_GENERAL))
    n = rng.randint(*sentences)
    return " ".join(_en_fill(rng, pool.pop(), vocab) for _ in range(min(n, len(pool))))


def en_document(rng: random.Random, topic: Optional[str] = None, paragraphs=(3, 6), title: bool = True) -> str:
    topic = topic or rng.choice(TOPICS)
    vocab = _focused(rng, _EN_TOPICS[topic])
    pool = rng.sample(_EN_GENERAL, len(_EN_GENERAL))
    paras = [en_paragraph(rng, topic, _pool=pool, _vocab=vocab) for _ in range(rng.randint(*paragraphs))]
    paras = [p for p in paras if p]
    if title:
        paras.insert(0, _en_fill(rng, rng.choice(_EN_TITLES), dict(vocab, S=vocab["S"][:1])))
    return "\n\n".join(paras)


# ---------------------------------------------------------------------------------------------------
# Passkey (SPEC §9.2; landmark-attention / YaRN style)

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_document(rng: random.Random, n_chars: Optional[int] = None, n_tokens: Optional[int] = None,
                     depth: Optional[float] = None, key: Optional[int] = None,
                     count_tokens: Optional[Callable[[str], int]] = None, filler: str = "grass") -> dict:
    if (n_chars is None) == (n_tokens is None):
        raise ValueError("give exactly one of n_chars or n_tokens")
    if n_tokens is not None and count_tokens is None:
        raise ValueError("n_tokens needs count_tokens(text) -> int")
    key = rng.randint(1, 50000) if key is None else int(key)
    depth = rng.random() if depth is None else float(depth)
    key_line = f"The pass key is {key}. Remember it. {key} is the pass key."
    head, tail = PASSKEY_TASK + " ", " " + PASSKEY_QUESTION

    def fits(body: str) -> bool:
        text = head + body + tail
        return len(text) <= n_chars if n_chars is not None else count_tokens(text) <= n_tokens

    chunks = _filler_chunks(rng, filler)
    body_parts: list[str] = []
    # Grow filler until the budget is met; token counting is done on whole candidates, so it stays exact.
    while True:
        nxt = next(chunks)
        trial = "".join(body_parts) + nxt
        if not fits(_splice(trial, key_line, depth)):
            break
        body_parts.append(nxt)
    body = _splice("".join(body_parts), key_line, depth)
    prompt = head + body + tail
    return {"text": f"{prompt} {key}.", "prompt": prompt, "answer": str(key), "key": key, "depth": depth,
            "n_chars": len(prompt)}


def _splice(filler: str, key_line: str, depth: float) -> str:
    cut = int(len(filler) * depth)
    # Cut at a sentence end so the key line stays a sentence of its own.
    while 0 < cut < len(filler) and filler[cut - 1] not in ".。 ":
        cut -= 1
    return filler[:cut] + key_line + " " + filler[cut:]


def _filler_chunks(rng: random.Random, kind: str):
    while True:
        if kind == "grass":
            yield PASSKEY_FILLER
        elif kind == "zh":
            yield zh_paragraph(rng)
        elif kind == "en":
            yield en_paragraph(rng) + " "
        else:
            raise ValueError(f"unknown filler {kind!r}: grass, zh or en")


# ---------------------------------------------------------------------------------------------------
# Chat SFT examples (InternLM2 ChatML; SPEC §3.2)

ACTION_START, ACTION_END, PLUGIN = "<|action_start|>", "<|action_end|>", "<|plugin|>"
SYSTEM_PROMPT = "You are a helpful assistant. Answer exactly."
TOOL_SYSTEM = ("You can call the calculator plugin. To call it, answer with "
               f"{ACTION_START}{PLUGIN}\\n{{\"name\": \"calculator\", \"parameters\": {{\"expression\": ...}}}}"
               f"{ACTION_END}.")
_WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "seven", "green", "paper", "music", "north", "salt",
          "piano", "bread", "glass", "orbit", "maple", "violet", "window", "ember"]


def _task(rng: random.Random, kind: str) -> tuple[str, str, Optional[str]]:
    """(question, answer, calculator expression or None)."""
    if kind in ("add", "sub", "mul"):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        if kind == "mul":
            a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = {"add": "+", "sub": "-", "mul": "*"}[kind]
        val = {"add": a + b, "sub": a - b, "mul": a * b}[kind]
        return f"What is {a} {op} {b}?", str(val), f"{a} {op} {b}"
    if kind == "copy":
        words = rng.sample(_WORDS, rng.randint(2, 5))
        return f"Repeat exactly: {' '.join(words)}", " ".join(words), None
    if kind == "reverse":
        words = rng.sample(_WORDS, rng.randint(2, 5))
        return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words)), None
    if kind == "kv":
        keys = rng.sample(_WORDS, 4)
        vals = [str(rng.randint(10, 99)) for _ in keys]
        q = rng.randrange(4)
        table = ", ".join(f"{k}={v}" for k, v in zip(keys, vals))
        return f"Given {table}. What is the value of {keys[q]}?", vals[q], None
    raise ValueError(f"unknown chat task {kind!r}")


def chat_examples(rng: random.Random, n: int, tools_fraction: float = 0.1,
                  kinds: Iterable[str] = ("add", "sub", "mul", "copy", "reverse", "kv")) -> list[dict]:
    kinds = tuple(kinds)
    out = []
    for _ in range(n):
        kind = rng.choice(kinds)
        question, answer, expr = _task(rng, kind)
        if expr is not None and rng.random() < tools_fraction:
            call = json.dumps({"name": "calculator", "parameters": {"expression": expr}})
            messages = [
                {"role": "system", "content": TOOL_SYSTEM},
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"{ACTION_START}{PLUGIN}\n{call}{ACTION_END}"},
                {"role": "environment", "name": "plugin", "content": json.dumps({"result": int(answer)})},
                {"role": "assistant", "content": answer},
            ]
            task = f"{kind}-tool"
        else:
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question},
                        {"role": "assistant", "content": answer}]
            task = kind
        out.append({"messages": messages, "task": task, "answer": answer})
    return out


def render_chatml(messages: list[dict]) -> str:
    parts = []
    for m in messages:
        name = f" name={m['name']}" if m.get("name") else ""
        parts.append(f"<|im_start|>{m['role']}{name}\n{m['content']}<|im_end|>\n")
    return "".join(parts)


def check_answer(example: dict, text: str) -> bool:
    return text.strip().split("<|im_end|>")[0].strip() == example["answer"]


# ---------------------------------------------------------------------------------------------------
# Conditional preference pairs (COOL RLHF; SPEC §8.1, §10)

CONDITION_PROMPTS = {
    "brief": "Answer with the result only, as briefly as possible.",
    "detailed": "Answer step by step: show the working, then the result.",
    "default": "",
}


def _working(a: int, op: str, b: int, val: int) -> str:
    return f"We compute {a} {op} {b}. {a} {op} {b} = {val}. The answer is {val}."


def preference_pairs(rng: random.Random, n: int,
                     conditions: Iterable[str] = ("brief", "detailed", "default")) -> list[dict]:
    conditions = tuple(conditions)
    for c in conditions:
        if c not in CONDITION_PROMPTS:
            raise ValueError(f"unknown condition {c!r}; known: {', '.join(CONDITION_PROMPTS)}")
    out = []
    for i in range(n):
        cond = conditions[i % len(conditions)]
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        wrong = val + rng.choice([-11, -3, -1, 1, 2, 10])
        short, long_ = str(val), _working(a, op, b, val)
        if cond == "brief":
            chosen, rejected = short, long_
        elif cond == "detailed":
            chosen, rejected = long_, short
        else:
            chosen = rng.choice([short, long_])
            rejected = str(wrong) if chosen == short else _working(a, op, b, wrong)
        out.append({"condition": cond, "system": CONDITION_PROMPTS[cond], "prompt": f"What is {a} {op} {b}?",
                    "chosen": chosen, "rejected": rejected, "answer": str(val)})
    return out
